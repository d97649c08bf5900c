"""Re-exports the JSON / JSONL helpers of fwm/files.py (their one home) under the names that fwm.envs and
fwm.trajectories import."""
from fwm.files import DataFormatError, read_json, read_jsonl, write_json, write_jsonl  # noqa: F401
