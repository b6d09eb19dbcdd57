"""A hook that makes one rank of a training job crash, so tests can watch the launcher end the whole job."""

from mmcv.runner import HOOKS, Hook


@HOOKS.register_module()
class FailOnRank(Hook):
    def __init__(self, rank: int, after_iters: int) -> None:
        self.rank = rank
        self.after_iters = after_iters

    def after_train_iter(self, runner) -> None:
        if runner.rank == self.rank and runner.iter + 1 >= self.after_iters:
            raise RuntimeError(f"injected failure on rank {self.rank} after {self.after_iters} iterations")
