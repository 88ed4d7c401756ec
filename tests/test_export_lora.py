"""Exporting a LoRA run for diffusers (`python -m jaxdit.export.lora`): the tensors of fixed adapters on the tiny
Wan 2.1 import are the committed ones that diffusers' `load_lora_weights` read (tests/fixtures/wan_lora, made by
its make_fixture.py in a side environment), jaxdit with those adapters computes what diffusers computed with them,
and the command writes a run's EMA adapters and refuses a run without any. Where diffusers, torch and peft import,
diffusers also reads a fresh export and computes what jaxdit computes."""

import importlib.util
import pathlib

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from jaxdit import init_from
from jaxdit.checkpoint import Checkpointer
from jaxdit.export.lora import adapter_tensors, main
from jaxdit.sharding import make_mesh
from jaxdit.train_step import abstract_train_state, make_model, split_model

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "wan_lora"
TOLERANCE = 1e-4  # max abs, jaxdit against diffusers (float32 on CPU; outputs of magnitude ~2)


def _load_fixture_module():
    spec = importlib.util.spec_from_file_location("wan_lora_adapters", FIXTURE / "adapters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


wan_lora = _load_fixture_module()


def filled(abstract, seed: int):
    """Arrays for a tree of shapes: zeros, and the key of `seed` where a PRNG key goes."""

    def fill(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jnp.broadcast_to(jax.random.key(seed), x.shape)
        return jnp.zeros(x.shape, x.dtype)

    return jax.tree.map(fill, abstract)


def channels_last(video: np.ndarray) -> np.ndarray:
    return einops.rearrange(video, "b c t h w -> b t h w c")  # diffusers' layout -> jaxdit's


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURE / "reference.npz"))


@pytest.fixture(scope="module")
def lora_run(wan_tiny_run):
    """The import's LoRA run config (scan_layers false) and its fixed adapters."""
    config = wan_lora.lora_config(wan_tiny_run)
    return config, wan_lora.adapters(config)


@pytest.fixture(scope="module")
def jaxdit_outputs(wan_tiny_run, lora_run, reference) -> dict[str, np.ndarray]:
    """jaxdit's VideoDiT on the reference inputs, with the adapters ("lora") and with them zeroed ("base"),
    in diffusers' layout (B, C, T, H, W)."""
    config, adapters = lora_run
    base = init_from.base_params(config, init_from.read_source(wan_tiny_run), make_mesh())
    graphdef, _, _, rngs = split_model(nnx.eval_shape(lambda: make_model(config, rngs=nnx.Rngs(0))), config)
    rngs = filled(rngs, config.train.seed)  # the streams the model holds; sampling without dropout draws none
    x = jnp.asarray(channels_last(reference["hidden_states"]))  # (B, T, H, W, C)
    t, text = jnp.asarray(reference["timestep"]), jnp.asarray(reference["encoder_hidden_states"])  # (B,), (B, L, 32)

    @jax.jit
    def forward(adapters):
        return nnx.merge(graphdef, base, adapters, rngs).dit(x, t, text=text)  # (B, T, H, W, C)

    outputs = {"lora": forward(adapters), "base": forward(jax.tree.map(jnp.zeros_like, adapters))}
    outputs = {name: einops.rearrange(np.asarray(out), "b t h w c -> b c t h w") for name, out in outputs.items()}
    return outputs


def write_lora_run(run: pathlib.Path, config, emas: dict) -> None:
    """A LoRA run's folder with a checkpoint at each step of `emas` (step -> EMA adapters), no training: the
    parameters are the EMA negated, every other array of the train state zero."""
    zeros = filled(abstract_train_state(config, make_mesh()), config.train.seed)
    with Checkpointer(run / "checkpoints", async_save=False) as checkpointer:
        for step, ema in emas.items():
            state = zeros.replace(step=jnp.int32(step), params=jax.tree.map(jnp.negative, ema), ema=ema)
            checkpointer.save(step, state, config=config.to_dict(), force=True)


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory) -> pathlib.Path:
    """The LoRA run written with the fixed adapters as step 2's EMA (halved at step 1), exported by the command."""
    config, adapters = lora_run
    run = tmp_path_factory.mktemp("runs") / "wan_lora"
    write_lora_run(run, config, {1: jax.tree.map(lambda a: a / 2, adapters), 2: adapters})
    out = run.parent / "wan_lora.safetensors"
    main([str(run), "--out", str(out)])
    return out


@pytest.mark.parametrize("scan_layers", [False, True])
def test_the_fixed_adapters_export_as_the_committed_file(wan_tiny_run, scan_layers):
    config = wan_lora.lora_config(wan_tiny_run, scan_layers=scan_layers)
    tensors = adapter_tensors(config, wan_lora.adapters(config))
    committed = load_file(FIXTURE / "adapters.safetensors")
    # 2 blocks x 10 diffusers projections (attn1's q, k, v, out; attn2's q, k, v, out; the FFN's two), A and B each
    assert sorted(tensors) == sorted(committed) and len(tensors) == 2 * 10 * 2
    assert committed["transformer.blocks.1.ffn.net.0.proj.lora_A.weight"].shape == (wan_lora.RANK, 24)
    assert committed["transformer.blocks.1.ffn.net.0.proj.lora_B.weight"].shape == (40, wan_lora.RANK)
    for key, array in committed.items():
        assert tensors[key].dtype == np.float32 and np.array_equal(tensors[key], array), key  # exact: see adapters.py


def test_jaxdit_with_the_adapters_computes_what_diffusers_computed(jaxdit_outputs, reference):
    lora, base = reference["output_lora"], reference["output_base"]
    assert np.abs(jaxdit_outputs["lora"] - lora).max() <= TOLERANCE
    assert np.abs(jaxdit_outputs["base"] - base).max() <= TOLERANCE
    assert np.abs(lora - base).max() > 1000 * TOLERANCE  # the adapters matter: the check cannot pass without them


def test_the_command_exports_the_ema_adapters_of_a_checkpoint(lora_run, exported, tmp_path, capsys):
    config, adapters = lora_run
    want = adapter_tensors(config, adapters)
    got = load_file(exported)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    halved = tmp_path / "step1.safetensors"
    main([str(exported.parent / "wan_lora"), "--out", str(halved), "--step", "1"])
    assert "load_lora_weights" in capsys.readouterr().out
    got = load_file(halved)
    assert all(np.array_equal(got[k], want[k] / 2) for k in want)  # halving is exact


def test_a_run_without_adapters_is_refused(wan_tiny_run, tmp_path):
    out = tmp_path / "none.safetensors"
    with pytest.raises(SystemExit, match=r"is not a LoRA run \(train.lora_rank=0\)"):
        main([str(wan_tiny_run), "--out", str(out)])
    with pytest.raises(SystemExit, match="no checkpoints in"):
        main([str(tmp_path), "--out", str(out)])
    assert not out.exists()


def test_diffusers_reads_the_export_and_computes_what_jaxdit_computes(exported, wan_tiny_source, jaxdit_outputs, reference):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")  # what load_lora_weights injects the adapters with
    pipe = diffusers.WanPipeline.from_pretrained(wan_tiny_source, dtype=torch.float32)
    pipe.load_lora_weights(exported)
    inputs = {k: torch.from_numpy(reference[k]) for k in ("hidden_states", "timestep", "encoder_hidden_states")}
    with torch.no_grad():
        out = pipe.transformer(**inputs, return_dict=False)[0].numpy()
    assert np.abs(out - jaxdit_outputs["lora"]).max() <= TOLERANCE
    assert np.abs(out - reference["output_lora"]).max() <= 1e-6
