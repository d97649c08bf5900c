"""Helpers shared by the sharding-parity tests: a one-device mesh and a leaf-by-leaf pytree comparison."""
import jax
import numpy as np

from fwm.mesh import make_mesh


def one_device_mesh():
    """A (1, 1, 1) mesh on the first device: the reference of every parity test."""
    return make_mesh({"data": 1}, devices=jax.devices()[:1])


def assert_trees_close(tree_a, tree_b, **tol):
    """np.testing.assert_allclose on each pair of leaves; a failure names the leaf's path."""
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(tree_a)[0], jax.tree.leaves(tree_b)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path), **tol)
