"""Multi-host: two local processes × 4 fake CPU devices (gloo collectives, a DCN×ICI hybrid mesh) train through the
real command line exactly like one process × 8 devices fed the same global batches."""

from __future__ import annotations

import socket

import cli_runs
import jax
import numpy as np
import pytest

from data_pipelines.latent_cache import make_latent_dataset
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.training.metrics_writer import read_metrics
from latent_lm.training.tasks import LatentLMTask
from latent_lm.latents import LatentNormalization
from latent_lm.training.train_loop import train

STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    hosts = str(tmp_path / "hosts")
    cli_runs.write_synthetic_cache(hosts)
    # ICI (1,2,2) inside each process, DCN (2,1,1) across the two: the global mesh is (2,2,2).
    over = cli_runs.overrides(STEPS, **{"mesh.shape": (1, 2, 2), "mesh.dcn_shape": (2, 1, 1)})
    port = _free_port()
    procs = [cli_runs.start(hosts, over, str(tmp_path / f"process{i}.log"), f"--coordinator_address=127.0.0.1:{port}",
                            "--num_processes=2", f"--process_id={i}", num_devices=4) for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=600) == 0, open(tmp_path / f"process{i}.log").read()[-3000:]

    # Reference: one process, 8 devices, mesh (2,2,2); global batch = process 0's rows then process 1's rows.
    config = cli_runs.make_config({**over, "mesh.shape": (2, 2, 2), "mesh.dcn_shape": (1, 1, 1)})
    cache = f"{hosts}/latents/train"
    shards = [iter(make_latent_dataset(cache, config.train.batch_size, seed=config.train.seed,
                                       process_index=i, process_count=2)) for i in range(2)]
    data = ({k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*shards))
    ref = train(LatentLMTask.from_config(config, LatentNormalization(**cli_runs.NORM)), data,
                optim_config=config.optim, train_config=config.train, mesh=make_mesh(config.mesh),
                rules=logical_rules(config.mesh), workdir=str(tmp_path / "ref"), checkpoint_config=config.checkpoint,
                log=lambda s: None)

    multi = read_metrics(f"{hosts}/lm")
    single = read_metrics(str(tmp_path / "ref"))
    assert [r["step"] for r in multi] == list(range(1, STEPS + 1))  # one writer: process 0
    np.testing.assert_allclose([r["loss"] for r in multi], [r["loss"] for r in single], rtol=1e-5)
    assert "[lm] step" not in open(tmp_path / "process1.log").read()
    state = cli_runs.trained_params(hosts, over)
    assert int(state.step) == STEPS
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(jax.device_get(ref.state.params))):
        np.testing.assert_allclose(x, y, atol=2e-5, rtol=2e-4)
