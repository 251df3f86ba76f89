"""Worker for tests/engine/test_grad_scaler_zero3.py: megadalle/train.py's own `main`, instrumented.

    [FP16_WORKER_POISON=BLOCK:UPDATE] [FP16_WORKER_NORM_INF=UPDATE] [FP16_WORKER_SPREAD=1] [FP16_WORKER_DUMP=DIR]
        torchrun --nproc_per_node 2 tests/engine/fp16_worker.py --config ...

FP16_WORKER_POISON: on rank 0 only, the gradient leaving resblock BLOCK's branch (towards the identity path)
becomes Inf at update UPDATE (its forward count: no activation checkpointing, one micro-batch per update). The
block's parameter gradients stay finite, so only rank 0's activation flag knows: the skip on rank 1 proves the
flags are agreed across ranks. FP16_WORKER_NORM_INF: DeepSpeed's clipping norm is Inf at update UPDATE although
every gradient partition is finite. FP16_WORKER_SPREAD: the blocks' log2 scales start at 14 + (i - 4), not all at
13, so that a wrong or missing division of a block's scale shows in the loss and the gradient norm.
FP16_WORKER_DUMP: each rank saves its scaler state to DIR/scaler_RANK.pt at the end, and to DIR/dtypes_RANK.json
its parameters' stored dtypes, the dtype each parameter's gradient was reduce-scattered in, whether the last
gathered values of each Linear's weight and bias are fp16-representable, and its modules' output dtypes.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import megadalle.engine.wrap as wrap
from megadalle.engine.grad_scaler import resblocks
from megadalle.train import main

SCALERS = []
DTYPES: dict[str, list[str]] = {}  # parameter or module name -> [stored, gathered] or [computed output]


def record_dtypes() -> None:
    """After the scaler's install: each parameter's stored partition dtype and gathered (communication) dtype,
    and, from the first forward, each module's output dtype."""
    from megadalle.engine import ds_grad_scaler

    original = ds_grad_scaler.install

    def install(optimizer, model, scaler):
        original(optimizer, model, scaler)
        names = {p.ds_id: name for name, p in model.named_parameters()}
        for name, p in model.named_parameters():
            DTYPES[name] = [str(p.ds_tensor.dtype)]
        reduce = optimizer._DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads

        def reduce_recorded(comm_dtype):  # the gradients in this bucket are reduce-scattered in comm_dtype
            for p in optimizer.ipg_buckets[comm_dtype].params:
                DTYPES[f"reduced:{names[p.ds_id]}"] = [str(comm_dtype)]
            return reduce(comm_dtype)

        optimizer._DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads = reduce_recorded
        norm_inf = int(os.environ.get("FP16_WORKER_NORM_INF", "0"))
        norms = optimizer._get_norm_groups

        def norm_groups():  # attempt k's norm is taken with scaler.updates == k - 1
            out = norms()
            return [torch.full_like(n, float("inf")) for n in out] if scaler.updates == norm_inf - 1 else out

        optimizer._get_norm_groups = norm_groups
        for name, module in model.named_modules():
            if type(module).__name__ == "Linear":  # the gathered values: fp16-representable when gathered in fp16
                module.register_forward_pre_hook(
                    lambda m, i, name=name: DTYPES.update(
                        {
                            f"gathered:{name}.{k}": [bool(torch.equal(t, t.half().float()))]
                            for k, t in (("weight", m.weight), ("bias", m.bias))
                        }  # fmt: skip
                    )
                )

        def record(name, out):
            if isinstance(out, torch.Tensor):
                DTYPES.setdefault(f"out:{name}", [str(out.dtype)])

        for name, module in model.named_modules():
            if name:
                module.register_forward_hook(lambda m, i, out, name=name: record(name, out))

    ds_grad_scaler.install = install


def instrument(poison: str) -> None:
    original = wrap.apply_grad_scaler

    def apply(model, **kw):
        scaler = original(model, **kw)
        SCALERS.append(scaler)
        if os.environ.get("FP16_WORKER_SPREAD"):
            n = scaler.n_blocks
            scaler.log2_scales[:n] = 14 + torch.arange(n, dtype=torch.float64) - 4
        if poison:
            block_index, update = map(int, poison.split(":"))
            block = resblocks(model)[block_index]
            branch, calls = block.branch, [0]

            def poisoned(x):
                calls[0] += 1
                if calls[0] == update and dist.get_rank() == 0:
                    x.register_hook(lambda g: g * float("inf"))
                return branch(x)

            block.branch = poisoned
        return scaler

    wrap.apply_grad_scaler = apply


if __name__ == "__main__":
    instrument(os.environ.get("FP16_WORKER_POISON", ""))
    record_dtypes()
    rc = main(sys.argv[1:])
    if os.environ.get("FP16_WORKER_DUMP") and SCALERS:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        dump = Path(os.environ["FP16_WORKER_DUMP"])
        torch.save(SCALERS[-1].state_dict(), dump / f"scaler_{rank}.pt")
        (dump / f"dtypes_{rank}.json").write_text(json.dumps(DTYPES))
    sys.exit(rc)
