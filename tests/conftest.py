import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
# The tests never reach a hub: set before huggingface_hub is imported (it reads this once), so that a lookup that
# must fail fails at once instead of retrying a connection. Subprocesses inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"

LONGEST_FIRST = (  # about a minute or more each on 2 cores; the short files then fill in behind them
    "test_workflow.py",
    "test_train.py",
    "test_real_teacher.py",
    "test_cache_teacher.py",
    "test_cross_tokenizer.py",
    "test_hf.py",
    "test_storage.py",
)


def pytest_collection_modifyitems(items):
    """The longest files first, so that `make test`'s workers (pytest-xdist, one file at a time, in this order:
    --no-loadscope-reorder, else xdist puts the files with the most tests first) finish together."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
