"""The pretraining config: types from YAML and key=value alike, one test per validation rule, --help, resume rules."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from tcm_mim.models import build_encoder
from tcm_mim.models.encoders import ENCODERS, encoder_patch_size
from tcm_mim.train import PretrainConfig, load_config
from tcm_mim.train.cli import main as pretrain_main
from tcm_mim.train.config import (CHANGES, FIXED, FREE, GROW, ConfigError, config_from_dict, keys_with_resume_rule,
                                  resume_changes)

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_numbers_in_e_notation_are_floats_from_yaml_and_key_value(tmp_path):
    cfg = load_config(REPO / "configs" / "pretrain_tcm.yaml", ["lr=1e-3"])  # the CLI's own example
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5e-2\nsteps: 1e3\nmax_grad_norm: 1\n")  # YAML 1.1 reads 1e-3 as text
    cfg = load_config(path)
    assert (cfg.lr, cfg.weight_decay, cfg.steps, cfg.max_grad_norm) == (1e-3, 5e-2, 1000, 1.0)
    assert isinstance(cfg.steps, int) and isinstance(cfg.max_grad_norm, float)


def test_key_value_types():
    cfg = load_config(None, ["compile=true", "backend=null", "mask_ratio=none", "prompts=left lung, heart",
                             "device=cuda:1", "max_grad_norm=0.5", "dim=3", "encoder=resnet3d_tiny", "image_size=24"])
    assert cfg.compile is True and cfg.backend is None and cfg.mask_ratio is None
    assert cfg.prompts == ["left lung", "heart"] and cfg.device == "cuda:1" and cfg.max_grad_norm == 0.5
    assert cfg.dim == 3 and cfg.spatial_dims == 3
    assert load_config(None, ["prompts=[liver, 'left kidney']"]).prompts == ["liver", "left kidney"]
    assert load_config(None, ["compile=no"]).compile is False


def test_defaults_the_other_branches_consume():
    cfg = PretrainConfig()
    assert (cfg.device, cfg.precision, cfg.compile, cfg.grad_accum_steps, cfg.max_grad_norm, cfg.skip_nonfinite) == (
        "auto", "auto", False, 1, None, 0)


# One case per rule: (override, the words the error must contain: key, value, what is allowed).
RULES = [
    ("steps=0", "steps must be >= 1, got 0"),
    ("batch_size=0", "batch_size must be >= 1, got 0"),
    ("log_every=0", "log_every must be >= 1, got 0"),
    ("checkpoint_every=0", "checkpoint_every must be >= 1, got 0"),
    ("image_every=-1", "image_every must be >= 0, got -1"),
    ("ema=5", r"ema must be in \[0, 1\), got 5.0"),
    ("ema=1", r"ema must be in \[0, 1\), got 1.0"),
    ("lr=0", "lr must be > 0, got 0.0"),
    ("lr=fast", "lr must be a float, got 'fast'"),
    ("lr=nan", r"lr must be a float, got 'nan' \(a finite number\)"),
    ("weight_decay=-1", "weight_decay must be >= 0, got -1.0"),
    ("warmup_steps=-1", "warmup_steps must be >= 0, got -1"),
    ("seed=-3", "seed must be >= 0, got -3"),
    ("steps=2.5", "steps must be an int, got '2.5'"),
    ("mask_ratio=1", r"mask_ratio must be in \(0, 1\), got 1.0"),
    ("roi_mask_ratio=1.5", r"roi_mask_ratio must be in \[0, 1\], got 1.5"),
    ("temperature=0", "temperature must be > 0, got 0.0"),
    ("amlp_ccl_blend=1.5", r"amlp_ccl_blend must be in \[0, 1\], got 1.5"),
    ("grad_accum_steps=0", "grad_accum_steps must be >= 1, got 0"),
    ("max_grad_norm=0", "max_grad_norm must be > 0, got 0.0"),
    ("skip_nonfinite=-1", "skip_nonfinite must be >= 0, got -1"),
    ("compile=maybe", r"compile must be a bool, got 'maybe' \(true or false\)"),
    ("method=mae", "method must be one of spark | tcm | anatomask | amlp, got 'mae'"),
    ("encoder=vit_b", "encoder must be one of resnet18 | .* | convnext_small, got 'vit_b'"),
    ("backend=gpu", "backend must be one of null | reference | cpu | triton | cuda, got 'gpu'"),
    ("device=gpu", "device must be auto | cpu | cuda | cuda:N, got 'gpu'"),
    ("device=cuda:x", "device must be auto | cpu | cuda | cuda:N, got 'cuda:x'"),
    ("precision=fp8", "precision must be one of auto | fp32 | bf16 | fp16, got 'fp8'"),
    ("dim=4", r"dim must be 2, 3 or null \(inferred from the encoder\), got 4"),
    ("image_size=100", "image_size 100 must be a multiple of the encoder's patch size 32"),
    ("prompts=[]", r"prompts must be a non-empty list of text for method tcm .*got \[\]"),
    ("prompts=", r"prompts must be a non-empty list of text for method tcm"),
    ("steps=null", "steps must be an int, got 'null'"),
]


@pytest.mark.parametrize(("override", "message"), RULES, ids=[r[0] for r in RULES])
def test_each_rule_names_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=f"^config: {message}"):
        load_config(None, [override])


@pytest.mark.parametrize(("line", "message"), [("steps: 0", "steps must be >= 1, got 0"),
                                               ("ema: 5", r"ema must be in \[0, 1\), got 5.0"),
                                               ("prompts: []", "prompts must be a non-empty list"),
                                               ("out_dir: 2024", r"out_dir must be a str, got 2024 \(quote it"),
                                               ("compile: 1.5", "compile must be a bool, got 1.5")])
def test_yaml_values_are_validated_like_overrides(tmp_path, line, message):
    path = tmp_path / "c.yaml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=f"^config: {message}"):
        load_config(path)


def test_direct_construction_is_validated_too():
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        PretrainConfig(batch_size=0)
    assert PretrainConfig(lr="1e-3").lr == 1e-3  # text converted like a key=value
    assert PretrainConfig(method="spark", prompts=[]).prompts == []  # only tcm needs text


def test_file_and_key_errors_name_the_source(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("methd: spark\n")
    with pytest.raises(ConfigError, match=r"unknown key 'methd' in .*c.yaml; did you mean method\?"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown key 'batchsize' in override 'batchsize=4'; did you mean "
                                          r"batch_size\?"):
        load_config(None, ["batchsize=4"])
    with pytest.raises(ConfigError, match="overrides are key=value, got 'steps'"):
        load_config(None, ["steps"])
    path.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping of key: value, got a list"):
        load_config(path)
    path.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match="c.yaml is not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read the config file .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


def test_help_lists_every_key_from_the_declarations(capsys):
    with pytest.raises(SystemExit) as exit_:
        pretrain_main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}
    for f in dataclasses.fields(PretrainConfig):
        assert f.name in lines, f"--help does not list {f.name}"
        assert f.metadata["help"] and f.metadata["help"] in " ".join(lines[f.name].split()), f.name
    assert "int = 200" in lines["steps"] and "[>= 1]" in lines["steps"]
    assert "float | null = null" in lines["max_grad_norm"] and "[> 0]" in lines["max_grad_norm"]
    assert "[spark | tcm | anatomask | amlp]" in lines["method"]
    assert "[auto | cpu | cuda | cuda:N]" in lines["device"] and "[auto | fp32 | bf16 | fp16]" in lines["precision"]
    assert "bool = false" in lines["compile"]
    assert "never change: method, encoder, dim, decoder_width" in " ".join(text.split())


def test_encoder_patch_size_matches_the_built_encoder():
    for name in ENCODERS:
        assert encoder_patch_size(name) == build_encoder(name, dim=3 if "3d" in name else 2).downsample_ratio, name


def test_resume_rules():
    old = PretrainConfig(method="spark", steps=10).to_dict()
    same = PretrainConfig(method="spark", steps=10)
    assert resume_changes(old, same, source="ck") == ({}, [])
    free = PretrainConfig(method="spark", steps=20, out_dir="elsewhere", device="cpu", log_every=1, compile=True)
    assert resume_changes(old, free, source="ck") == ({}, [])  # steps grew; the rest are free
    changed = PretrainConfig(method="spark", steps=5, lr=1e-3, batch_size=4)
    assert resume_changes(old, changed, source="ck") == ({"steps": (10, 5), "lr": (2e-3, 1e-3),
                                                          "batch_size": (8, 4)}, [])
    assert resume_changes(old, PretrainConfig(method="amlp", steps=10), source="ck")[1] == ["method 'spark' -> 'amlp'"]
    # a checkpoint written before a key existed compares it at its default
    older = {k: v for k, v in old.items() if k != "max_grad_norm"}
    assert resume_changes(older, same, source="ck") == ({}, [])
    with pytest.raises(ConfigError, match=r"ck has config keys \['gone'\] that this version does not know"):
        config_from_dict({**old, "gone": 1}, source="ck")
    with pytest.raises(ConfigError, match=r"ck: its stored config is not valid: config: ema must be in \[0, 1\)"):
        config_from_dict({**old, "ema": 5.0}, source="ck")
    rules = {FREE, GROW, CHANGES, FIXED}
    assert sum(len(keys_with_resume_rule(r)) for r in rules) == len(dataclasses.fields(PretrainConfig))
    assert keys_with_resume_rule(GROW) == ["steps"] and "lr" in keys_with_resume_rule(CHANGES)
