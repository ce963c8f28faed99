"""lm-eval ``custom_dataset`` hook: JSONL files of this folder's data/ (see dlf_plugin.taskdata)."""
from pathlib import Path

from dlf_plugin.taskdata import jsonl_loader

load_jsonl = jsonl_loader(Path(__file__).parent / "data")
