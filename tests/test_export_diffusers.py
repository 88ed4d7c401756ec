"""Exporting a run as a diffusers folder (`python -m jaxdit.export.diffusers`): the tiny Wan 2.1 import exports as
the diffusers folder it was imported from, tensor for tensor, with every field of its config.json and the
pipeline's other parts beside it; a sharded bfloat16 export indexes every tensor; a LoRA run of the import, its
blocks scanned, exports its adapters merged into the base weights; runs of other models are refused. Where torch
and diffusers import, diffusers reads the LoRA run's export and computes what jaxdit computes."""

import json
import pathlib

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdit import init_from
from jaxdit.checkpoint import Checkpointer
from jaxdit.config import Config, ConfigError
from jaxdit.convert import SafetensorsFolder
from jaxdit.convert.wan import wan_model_config
from jaxdit.export.diffusers import (
    PIPELINE_INDEX,
    PIPELINE_PARTS,
    STEM,
    check_exportable,
    main,
    pipeline_source,
    read_weights,
)
from jaxdit.export.lora import PREFIX, adapter_tensors
from jaxdit.model import VideoDiT
from jaxdit.model_config import ModelConfig
from tests.test_export_lora import FIXTURE, TOLERANCE, channels_last, wan_lora, write_lora_run

# Fields of the fixture's config.json the export writes otherwise: the version of diffusers that saved it, and the
# RoPE tables' length, which the tiny fixture cut to 32 and the export writes as Wan 2.1's 1024 (jaxdit's RoPE has
# no limit, and diffusers' tables only need to cover the patches along each axis).
NOT_COMPARED = ("_diffusers_version", "rope_max_seq_len")
SHARD_GB = 0.00002  # 20 kB: the tiny transformer's 84 kB of float32 (42 kB in bfloat16) in several shards


def weights(folder: pathlib.Path, dtype=None) -> dict[str, np.ndarray]:
    """Every tensor of a diffusers transformer folder, single file or shards."""
    tensors = SafetensorsFolder(folder, STEM, dtype=dtype)
    return {key: tensors[key] for key in tensors}


@pytest.fixture(scope="module")
def exported(wan_tiny_run, tmp_path_factory) -> pathlib.Path:
    """The import exported by the command, with the pipeline folder its imported.json records."""
    out = tmp_path_factory.mktemp("export") / "wan_tiny-diffusers"
    main([str(wan_tiny_run), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def lora_exported(wan_tiny_run, tmp_path_factory):
    """A LoRA run of the import (every projection adapted, blocks scanned) with the fixed adapters of
    tests/fixtures/wan_lora as its EMA, started from the import, exported by the command: (config, adapters, out)."""
    config = wan_lora.lora_config(wan_tiny_run, scan_layers=True)
    adapters = wan_lora.adapters(config)
    run = tmp_path_factory.mktemp("runs") / "wan_lora"
    write_lora_run(run, config, {1: adapters})
    init_from.record_start(run, init_from.read_source(wan_tiny_run), primary=True)  # where its base weights are
    out = run.parent / "wan_lora-diffusers"
    main([str(run), "--out", str(out)])
    return config, adapters, out


def test_the_import_exports_as_the_folder_it_was_imported_from(exported, wan_tiny_source):
    got, want = weights(exported / "transformer"), weights(wan_tiny_source / "transformer")
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():  # float32 both ways: the exact inverse of the import
        assert got[key].dtype == np.float32 and np.array_equal(got[key], tensor), key
    assert (exported / "transformer" / f"{STEM}.safetensors").is_file()  # 84 kB: one file, no index
    config = json.loads((exported / "transformer" / "config.json").read_text())
    fixture = json.loads((wan_tiny_source / "transformer" / "config.json").read_text())
    assert {k: config[k] for k in fixture if k not in NOT_COMPARED} == {k: v for k, v in fixture.items() if k not in NOT_COMPARED}
    assert config["rope_max_seq_len"] == 1024 and wan_model_config(config) == wan_model_config(fixture)
    for part in PIPELINE_PARTS:  # copied from the recorded source folder
        assert sorted(p.name for p in (exported / part).iterdir()) == sorted(p.name for p in (wan_tiny_source / part).iterdir())
    assert (exported / PIPELINE_INDEX).read_text() == (wan_tiny_source / PIPELINE_INDEX).read_text()


def test_a_sharded_bfloat16_export_indexes_every_tensor(wan_tiny_run, wan_tiny_source, tmp_path, capsys):
    out = tmp_path / "sharded"
    main([str(wan_tiny_run), "--out", str(out), "--dtype", "bfloat16", "--max-shard-gb", str(SHARD_GB),
          "--pipeline", str(wan_tiny_source)])
    assert "WanPipeline.from_pretrained" in capsys.readouterr().out
    transformer = out / "transformer"
    index = json.loads((transformer / f"{STEM}.safetensors.index.json").read_text())
    want = weights(wan_tiny_source / "transformer")
    files = sorted(set(index["weight_map"].values()))
    assert sorted(index["weight_map"]) == sorted(want) and len(files) > 2
    assert files == sorted(p.name for p in transformer.glob(f"{STEM}-*-of-*.safetensors"))
    assert index["metadata"]["total_size"] == 2 * sum(t.size for t in want.values())
    got = weights(transformer)
    for key, tensor in want.items():  # rounded to bfloat16 as NumPy rounds
        assert got[key].dtype == jnp.bfloat16 and np.array_equal(got[key], tensor.astype(jnp.bfloat16)), key


def test_a_lora_run_exports_its_adapters_merged_into_the_base(lora_exported, wan_tiny_source):
    config, adapters, out = lora_exported
    pairs = adapter_tensors(config, adapters)  # diffusers' lora_A (R, in) and lora_B (out, R), alpha / R folded in
    base, got = weights(wan_tiny_source / "transformer"), weights(out / "transformer")
    assert sorted(got) == sorted(base)
    adapted = 0
    for key, tensor in base.items():
        module = f"{PREFIX}.{key.removesuffix('.weight')}"
        if f"{module}.lora_A.weight" in pairs:  # W + B A: PEFT's merge
            merged = tensor + pairs[f"{module}.lora_B.weight"] @ pairs[f"{module}.lora_A.weight"]
            np.testing.assert_allclose(got[key], merged, rtol=0, atol=1e-6, err_msg=key)
            assert np.abs(got[key] - tensor).max() > 1e-2, key  # the adapters changed it
            adapted += 1
        else:
            assert np.array_equal(got[key], tensor), key
    assert adapted == 2 * 10  # every projection of both blocks
    assert all((out / part).is_dir() for part in PIPELINE_PARTS)  # the source, found through init_from.json


def test_runs_of_other_models_and_taken_folders_are_refused(wan_tiny_run, wan_tiny_source, exported, tmp_path):
    with pytest.raises(SystemExit, match="error: no checkpoints in"):
        main([str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="error: no checkpoint of step 7"):
        main([str(wan_tiny_run), "--out", str(tmp_path / "out"), "--step", "7"])
    with pytest.raises(SystemExit, match="is not empty"):
        main([str(wan_tiny_run), "--out", str(exported)])
    run = tmp_path / "dit"  # a checkpoint of a DiT of jaxdit's own layout: refused by its config, before any weight
    with Checkpointer(run / "checkpoints", async_save=False) as checkpointer:
        checkpointer.save(1, {"step": jnp.int32(1)}, config=Config(model=ModelConfig(variant="tiny/1x2x2")).to_dict(), force=True)
    with pytest.raises(SystemExit, match=r"error: .* is not a model in Wan 2.1's layout \(model.positions="):
        main([str(run), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    wan = wan_model_config(json.loads((wan_tiny_source / "transformer" / "config.json").read_text()))
    with pytest.raises(ConfigError, match=r"text.encoder='byte'"):  # Wan's blocks on a text encoder diffusers lacks
        check_exportable(Config(model=wan), "a run")


def test_a_pipeline_folder_that_is_gone_leaves_transformer_only_with_a_note(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "imported.json").write_text(json.dumps({"source": str(tmp_path / "moved")}))
    source, note = pipeline_source(run)
    assert source is None and "which is gone, so only transformer/ is written" in note
    assert pipeline_source(run, "elsewhere") == (pathlib.Path("elsewhere"), "")


def jaxdit_output(run: pathlib.Path, reference: dict) -> np.ndarray:
    """The run's weights as the export reads them (a LoRA run's merged) in jaxdit's VideoDiT on the reference
    inputs, (B, C, T, H, W)."""
    _, config, dit = read_weights(run)
    model = VideoDiT(config.model, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, jax.tree.map(jnp.asarray, dit))
    nnx.update(model, params)
    x = jnp.asarray(channels_last(reference["hidden_states"]))  # (B, T, H, W, C)
    out = model(x, jnp.asarray(reference["timestep"]), text=jnp.asarray(reference["encoder_hidden_states"]))
    return einops.rearrange(np.asarray(out), "b t h w c -> b c t h w")


def test_diffusers_reads_the_lora_export_and_computes_what_jaxdit_computes(lora_exported):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    _, _, out = lora_exported
    diffusers.WanPipeline.from_pretrained(out, dtype=torch.float32)  # every part of the folder loads
    transformer, info = diffusers.WanTransformer3DModel.from_pretrained(out / "transformer", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    reference = dict(np.load(FIXTURE / "reference.npz"))
    inputs = {k: torch.from_numpy(reference[k]) for k in ("hidden_states", "timestep", "encoder_hidden_states")}
    with torch.no_grad():
        got = transformer.float()(**inputs, return_dict=False)[0].numpy()
    want = jaxdit_output(out.parent / "wan_lora", reference)
    print(f"max abs difference: diffusers vs jaxdit {np.abs(got - want).max():.2e}, "
          f"vs diffusers with the adapters unmerged {np.abs(got - reference['output_lora']).max():.2e}")
    assert np.abs(got - want).max() <= TOLERANCE
    assert np.abs(got - reference["output_lora"]).max() <= TOLERANCE  # diffusers with the adapters unmerged
