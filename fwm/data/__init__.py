"""Grain data for every stage: sources (JSONL, Parquet, ArrayRecord), per-stage validation, pipelines.

sources.py      random-access file sources that remember file and line/row of each record
records.py      per-stage record formats and validation (raise, or skip and count)
features.py     validated records -> token arrays (input-aligned targets, loss weights, span ids)
pipelines.py    lm_pipeline / sft_pipeline / rl_pipeline: shard, shuffle, validate, pack, batch
checkpointing.py  orbax Composite arguments for the data iterator
"""
from fwm.data.checkpointing import checkpoint_args_restore, checkpoint_args_save
from fwm.data.features import DEFAULT_TRAINED_ROLES, lm_example, sft_example
from fwm.data.pipelines import lm_pipeline, load_rl_tasks, rl_pipeline, sft_pipeline
from fwm.data.records import ROLES, BadRecordError, RecordValidator, parse_record
from fwm.data.sources import SourceRecord, open_source
