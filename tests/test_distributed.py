import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mope.config import TrainConfig
from mope.distributed import DistInfo
from mope.metrics import read_metrics
from mope.trainer import Rollout, Trainer
from tests.mope_setup import make_config, make_training_dir, params


def one_rank(rank: int, world: int, port: int, settings: dict, out: str) -> None:
    """Train one step as rank `rank` of `world` (gloo), recording its rollout, rewards and parameters."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        trainer = Trainer(TrainConfig(**settings), dist_info=DistInfo(rank, world, "cpu"))
        seen = {}
        rollout, rewards = trainer.rollout, trainer.rewards
        trainer.rollout = lambda batch, step: seen.setdefault("rollout", rollout(batch, step))
        trainer.rewards = lambda r: seen.setdefault("rewards", rewards(r))
        trainer.train()
        torch.save({"rollout": seen["rollout"], "rewards": seen["rewards"][0], "params": params(trainer)},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path):
    setup = make_training_dir(tmp_path)
    config = make_config(setup, tmp_path / "ddp", steps=1, batch_size=4, epochs=2, max_tokens=5)
    mp.spawn(one_rank, args=(2, free_port(), config.to_dict(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # each rank rolled out its own half of the step's batch
    single = Trainer(make_config(setup, tmp_path / "single", steps=1, batch_size=4, epochs=2, max_tokens=5))
    global_batch = single.batch(1)
    assert [r["rollout"].prompts[::2] for r in ranks] == [[p for p, _ in global_batch[:2]],
                                                           [p for p, _ in global_batch[2:]]]
    rollout = Rollout.concat([r["rollout"] for r in ranks])
    start = params(single)
    single.update(rollout, torch.cat([r["rewards"] for r in ranks]))
    expected = params(single)
    # AdamW divides by sqrt(v) + 1e-8: where a gradient is ~1e-9 (a token seen once, far from the loss) the
    # ranks' all-reduced sum and the single batch's sum, equal up to rounding, give visibly different steps.
    # Those entries are compared loosely, and must be rare among the ones with a gradient (unseen tokens' rows
    # have none and are compared strictly).
    state = single.optimizer.state
    second_moment = {name: state[p]["exp_avg_sq"] for name, p in single.pcm.named_parameters() if p in state}
    for r in ranks:
        for name, value in expected.items():
            moment = second_moment.get(name)
            if moment is None:
                moment = torch.ones_like(value)
            noisy = (moment > 0) & (moment.sqrt() < 1e-7)
            assert noisy.sum() < 0.01 * (moment > 0).sum(), name
            got = r["params"][name]
            torch.testing.assert_close(got[~noisy], value[~noisy], atol=2e-6, rtol=1e-5, msg=name)
            torch.testing.assert_close(got[noisy], value[noisy], atol=1e-4, rtol=0, msg=name)
    assert any(not torch.equal(start[n], expected[n]) for n in expected)
    (row,) = read_metrics(tmp_path / "ddp" / "metrics.jsonl")  # rank 0 wrote the reduced metrics
    assert row["step"] == 1 and row["response_tokens"] > 0
