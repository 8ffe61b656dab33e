"""Peak host memory of the merge stage, in a process of its own so nothing else shares the figure.

Usage: python bench/merge_memory.py BASE ADAPTER_RESULT_JSON DATASET_JSON OUT_DIR
Prints one JSON line: {"baseline_mb": resident set after imports, "peak_mb": high-water mark of the merge}.
"""

import json
import sys
from pathlib import Path

from llmops.config import MergeParams
from tasks.finetune import FinetuneResult
from tasks.merge import merge_adapter
from tasks.validate import DatasetRef


def resident_mb(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith(f"{field}:")).split()[1]) / 1024


base, adapter, data, out = sys.argv[1:5]
adapter_result = FinetuneResult.model_validate_json(Path(adapter).read_text())
dataset = DatasetRef.model_validate_json(Path(data).read_text())
baseline = resident_mb("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the high-water mark here, after the imports
merge_adapter(MergeParams(), base, adapter_result, dataset, Path(out))
print(json.dumps({"baseline_mb": baseline, "peak_mb": resident_mb("VmHWM")}))
