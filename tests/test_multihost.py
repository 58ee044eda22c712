"""Multi-host: two local processes × 4 fake CPU devices (gloo collectives, a DCN×ICI hybrid mesh) train through the
real command line exactly like one process × 8 devices fed the same global batches (slow). The fast test checks what
that rests on, without training: the runtime starts from the CLI's flags, the hybrid mesh puts each process's devices
in its own DCN row, the processes' data slices assemble into the global batch the one-process reference is fed,
compiled collectives span both processes, one process writes the metrics, and a sharded checkpoint round-trips.
(That the same global batches on the same (2,2,2) mesh train like one device is test_sharding's.)"""

from __future__ import annotations

import socket
import subprocess
import sys

import cli_runs
import jax
import numpy as np
import pytest

from data_pipelines.latent_cache import make_latent_dataset
from latent_lm.parallel.mesh import logical_rules, make_mesh
from latent_lm.training.metrics_writer import read_metrics
from latent_lm.sampling import make_sampler
from latent_lm.training.tasks import LatentLMTask
from latent_lm.latents import LatentNormalization
from latent_lm.training.train_loop import train

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SAMPLE_LABELS = [3, 0, 2]


def sampling_setup():
    """A tiny class-conditional LatentLM, a schedule, sampler settings and N(0, 0.1²) parameters from a fixed seed."""
    import flax.linen as nn
    import jax.numpy as jnp
    from latent_lm.diffusion import make_schedule
    from latent_lm.models.latent_lm import LatentLM, LatentLMConfig
    from latent_lm.sampling import SamplerSettings

    model = LatentLM(LatentLMConfig(width=32, depth=1, num_heads=2, latent_dim=2, head_depth=1, num_classes=4,
                                    text_vocab_size=2, max_len=2))
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32),
                                       jnp.zeros((1, 2, 2)), jnp.zeros((1, 2), bool)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.normal(0.0, 0.1, x.shape).astype(np.float32), abstract)
    return model, make_schedule("cosine", 1000), SamplerSettings(num_steps=2, cfg_scale=2.0), params


_PROCESS_SCRIPT = r"""
import sys
pid, port, cache, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
from latent_lm.parallel import distributed
assert distributed.initialize(f"127.0.0.1:{port}", 2, pid)  # what latent_lm.main does with the flags

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from data_pipelines.latent_cache import make_latent_dataset
from latent_lm.checkpoint import Checkpointer
from latent_lm.parallel.mesh import batch_sharding, make_mesh, shard_batch
from latent_lm.training.metrics_writer import MetricsWriter

assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
mesh = make_mesh(ml_collections.ConfigDict(dict(shape=(1, 2, 2), dcn_shape=(2, 1, 1))))
assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
# the DCN factor is the data axis: row p of the mesh is process p's ICI block
assert [{d.process_index for d in mesh.devices[p].flat} for p in range(2)] == [{0}, {1}]
local = next(iter(make_latent_dataset(cache, 16, seed=0)))  # this process's 8 rows of the global batch of 16
batch = shard_batch(local, mesh)
assert batch["latents"].shape == (16, 49, 4)
gathered = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in batch.items()}
mean = jax.jit(lambda x: jnp.mean(x, axis=0))(batch["latents"])  # a compiled cross-process reduction
mean = multihost_utils.process_allgather(mean, tiled=True)

writer = MetricsWriter(workdir, tensorboard=False)
writer.write(1, {"loss": float(pid)})
writer.close()
ckpt = Checkpointer(f"{workdir}/checkpoints", async_save=False)
ckpt.save(1, {"latents": batch["latents"]}, force=True)
abstract = {"latents": jax.ShapeDtypeStruct((16, 49, 4), jnp.float32, sharding=batch_sharding(mesh, 3))}
restored, _ = ckpt.restore(abstract)
ckpt.close()
restored = multihost_utils.process_allgather(restored["latents"], tiled=True)

# The sample stage's batch: labels every process holds, padded to data×fsdp = 4 and split over both processes.
from jax.sharding import NamedSharding, PartitionSpec
from latent_lm.parallel.mesh import data_parallel_size, global_rows, host_arrays, pad_rows
from latent_lm.sampling import make_sampler
sys.path.insert(0, "tests")
from test_multihost import SAMPLE_LABELS, sampling_setup
model, schedule, settings, params = sampling_setup()
params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
labels = global_rows(pad_rows(np.array(SAMPLE_LABELS, np.int32), data_parallel_size(mesh)), mesh)
assert labels.shape == (4,) and not labels.is_fully_addressable
z = make_sampler(model, schedule, settings, 2)(params, labels, jax.random.PRNGKey(7))
# a row per (data, fsdp) device pair, replicated over tensor: each process sampled its own 2 of the 4 rows
assert z.sharding.shard_shape(z.shape)[0] == 1 and len({s.index[0].start for s in z.addressable_shards}) == 2
sampled = host_arrays(z)
if pid == 0:
    np.savez(f"{workdir}/out.npz", mean=mean, restored=restored, sampled=sampled, **gathered)
print("OK", pid)
"""


def test_two_processes_assemble_the_global_batch_on_a_hybrid_mesh(tmp_path):
    cache = str(tmp_path / "hosts")
    cli_runs.write_synthetic_cache(cache, count=64)
    script = tmp_path / "process.py"
    script.write_text(_PROCESS_SCRIPT)
    port = _free_port()
    env = dict(cli_runs.env(4), PYTHONPATH=cli_runs.ROOT)
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), f"{cache}/latents/train",
                               str(tmp_path / "run")], cwd=cli_runs.ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "OK" in out, out[-3000:]

    # The global batch the slow test's one-process reference is fed: process 0's rows, then process 1's.
    shards = [next(iter(make_latent_dataset(f"{cache}/latents/train", 16, seed=0, process_index=i,
                                            process_count=2))) for i in range(2)]
    want = {k: np.concatenate([shards[0][k], shards[1][k]]) for k in shards[0]}
    out = np.load(tmp_path / "run" / "out.npz")
    assert not np.array_equal(shards[0]["latents"], shards[1]["latents"])  # two different slices
    for k in want:
        np.testing.assert_array_equal(out[k], want[k])
    np.testing.assert_array_equal(out["restored"], want["latents"])
    np.testing.assert_allclose(out["mean"], want["latents"].mean(0), rtol=1e-5, atol=1e-6)
    # Two processes sampled their halves of the padded batch; the real rows equal one unsharded call.
    model, schedule, settings, params = sampling_setup()
    want_z = make_sampler(model, schedule, settings, 2)(params, np.array(SAMPLE_LABELS, np.int32),
                                                         jax.random.PRNGKey(7))
    np.testing.assert_allclose(out["sampled"][:len(SAMPLE_LABELS)], want_z, atol=1e-5)
    assert [r["loss"] for r in read_metrics(str(tmp_path / "run"))] == [0.0]  # process 0 alone writes


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    hosts = str(tmp_path / "hosts")
    cli_runs.write_synthetic_cache(hosts)
    # ICI (1,2,2) inside each process, DCN (2,1,1) across the two: the global mesh is (2,2,2).
    over = cli_runs.overrides(STEPS, **{"mesh.shape": (1, 2, 2), "mesh.dcn_shape": (2, 1, 1)})
    port = _free_port()
    procs = [cli_runs.start(hosts, over, str(tmp_path / f"process{i}.log"), f"--coordinator_address=127.0.0.1:{port}",
                            "--num_processes=2", f"--process_id={i}", num_devices=4)
             for i in range(2)]
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
