"""CPU training keeps its freed buffers instead of page-faulting them back every step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from clt_lens.training.host_memory import retain_freed_memory

# A real training step (runner-built Trainer), timed for page faults with glibc's defaults and
# then after retain_freed_memory() in the same process (the call is one-way). The
# pre-activations [2, 1024, 8192] fp32 are 64 MB: above glibc's largest dynamic mmap threshold.
CHILD = """
import json, resource, tempfile
import torch
from clt_lens.clt.config import CLTSpec
from clt_lens.training.config import TrainConfig
from clt_lens.training.host_memory import retain_freed_memory
from clt_lens.training.runner import CLTTrainingRunner
from clt_lens.training.sources import SyntheticSource
from clt_lens.training.trainer import Trainer

torch.set_num_threads(1)

class Built(Trainer):
    def train(self):
        return self

src = SyntheticSource(1024, 2, 32)
cfg = TrainConfig(clt=CLTSpec(d_sae=8192, decode="dense"), batch_size=1024, eval_every=10**9,
                  normalization_tokens=1024, progress=False, out_dir=tempfile.mkdtemp(),
                  retain_host_memory=False)
runner = CLTTrainingRunner(cfg, override_source=src, override_heldout=src.next())
runner.trainer_cls = Built
trainer = runner.run()

def faults_per_step():
    # the fewest of three steps: a step that the host's memory reclaim happens to hit faults
    # more, which says nothing about the allocator
    trainer._train_step()
    counts = []
    for _ in range(3):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        trainer._train_step()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return min(counts)

default = faults_per_step()
took = retain_freed_memory()
print(json.dumps({"default": default, "retained": faults_per_step(), "took": took}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_training_step_stops_page_faulting_its_buffers():
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                       timeout=300)  # fmt: skip
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if not out["took"]:
        pytest.skip("not glibc: mallopt is not there to tune")
    # each step maps >= 64 MB afresh by default: >= 32 faults even with 2 MB huge pages
    assert out["default"] >= 32, out
    assert out["retained"] < out["default"] / 10, out


def test_retain_is_idempotent():
    first = retain_freed_memory()
    assert retain_freed_memory() == first
