"""Worker for tests/engine/test_powersgd.py: engine/powersgd.py on 4 real processes as 2 node groups x 2 GPUs.

    torchrun --nproc_per_node N tests/engine/powersgd_worker.py OUT_DIR D R STEPS M

N ranks as N / M node groups of M GPUs.

Each rank holds the shards of a transformer layer of width D as the paper shards them over M GPUs (Table 2:
three qkv and the post-attention d x d/m, MLP1 d x 4d/m, MLP2 4d/m x d), a gain and an embedding shard. Node k's
gradient of shard j at step t is `tests.engine.test_powersgd.node_gradient(...)`: low rank plus noise, times the
shard's gradient scale. Each rank writes OUT_DIR/rank_R.pt: the averaged shards of every step, the error buffers
at the end, the bytes sent across node groups by the compressed shards alone, and the summed checkpoint state.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: `tests` is not installed

from megadalle.engine.powersgd import Collectives, PowerSGD, Topology, new_groups  # noqa: E402
from tests.engine.test_powersgd import SCALES, node_gradient, shards_for  # noqa: E402


def main() -> None:
    out_dir, d, r, steps, m = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    dist.init_process_group("gloo")
    topo = Topology(dist.get_world_size(), m, dist.get_rank())
    node_group, cross_group = new_groups(topo)
    shards = shards_for(d, topo.gpus_per_node)
    comm = Collectives(cross_group, topo.n_nodes)
    psgd = PowerSGD(shards, r // topo.gpus_per_node, comm, seed=7)
    outs, sqs = [], []
    for t in range(steps):
        grads = [node_gradient(topo.node, topo.local, j, t, s) for j, s in enumerate(shards)]
        avg, sq = psgd.reduce(grads, [SCALES[s.slot] for s in shards])
        dist.all_reduce(sq, group=node_group)  # the squared global norm: every shard of the node group
        outs.append(avg)
        sqs.append(float(sq))
    # the bytes of the compressed shards alone: a twin without the uncompressed ones, one more step
    only = [s for s in shards if s.matrix is not None]
    twin = Collectives(cross_group, topo.n_nodes)
    PowerSGD(only, r // topo.gpus_per_node, twin, seed=7).reduce(
        [node_gradient(topo.node, topo.local, shards.index(s), 0, s) for s in only], [SCALES[s.slot] for s in only]
    )
    summed = psgd.summed_state()
    torch.save({"outs": outs, "sqs": sqs, "e": psgd.state_dict(), "bytes": twin.bytes_sent,
                "rate": psgd.element_rate(), "summed": summed, "n_compressed": len(psgd.compressed)},
               out_dir / f"rank_{dist.get_rank()}.pt")  # fmt: skip
    psgd.load_summed_state(summed)
    torch.save(psgd.state_dict(), out_dir / f"resumed_{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
