"""A torchrun worker for test_compat: DataContainer batches through build_ddp('cpu') and CPU result collection."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from recnext_cli import compat


class TinyDetectorLike(torch.nn.Module):
    """Has mmdet's train_step/forward signatures, so mmcv's wrapper hands it unwrapped DataContainer contents."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, img, return_loss=False):
        return self.linear(img).sum(dim=1).tolist()

    def train_step(self, data, optimizer):
        loss = self.linear(data["img"]).pow(2).mean()
        return {"loss": loss, "log_vars": {"loss": loss.item()}, "num_samples": data["img"].shape[0]}


def main(out_dir: str) -> None:
    from mmcv.parallel import DataContainer

    applied = compat.apply_all()
    assert "cpu-distributed" in applied, applied
    rank, world = compat.init_distributed("cpu")
    assert world == 2 and dist.get_backend() == "gloo"
    import mmdet.apis.test as mmdet_test
    import mmdet.utils as mmdet_utils

    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = mmdet_utils.build_ddp(TinyDetectorLike(), "cpu", device_ids=[rank], broadcast_buffers=False)
    batch = {"img": DataContainer([torch.full((2, 4), float(rank + 1))], stack=True)}
    output = model.train_step(batch, None)
    output["loss"].backward()
    grad = model.module.linear.weight.grad.clone()
    gathered = [torch.zeros_like(grad) for _ in range(world)]
    dist.all_gather(gathered, grad)
    assert torch.allclose(gathered[0], gathered[1]), "gradients were not averaged across workers"

    prediction = model(img=DataContainer([torch.ones(1, 4)], stack=True))
    assert len(prediction) == 1

    results = mmdet_test.collect_results_cpu([f"r{rank}-a", f"r{rank}-b"], 4)
    if rank == 0:
        assert results == ["r0-a", "r1-a", "r0-b", "r1-b"], results
    dist.barrier()
    Path(out_dir, f"rank{rank}.ok").write_text("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
