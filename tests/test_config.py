"""Configuration checked at load time against the registries: an unknown name or a bad parameter is an
error naming the field and what it allows, before any process starts."""

from __future__ import annotations

import re

import pytest

import attacks
import defenses
from spirt import backends, cli, data, executors, models
from spirt.config import Config, ConfigError, load_config


def _allowed(names) -> str:
    return ", ".join(map(repr, names))


def _error(overrides: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    return str(exc.value)


@pytest.mark.parametrize("field, names", [
    ("model.name", models.names),
    ("data.dataset", data.names),
    ("data.partition", data.partition_names),
    ("aggregation.backend", backends.names),
    ("executor.kind", executors.names),
    ("aggregation.defense", lambda: defenses.names("aggregator")),
    ("attack.name", attacks.names),
])
def test_unknown_names_are_rejected_with_the_allowed_ones(field, names):
    msg = _error({field: "nope"})
    assert msg.startswith("invalid configuration in defaults:\n")
    assert f"  {field}: got 'nope'; allowed: {_allowed(names())}" in msg.splitlines()


def test_every_registered_name_is_accepted():
    for name in models.names():
        assert load_config(None, {"model.name": name}).model.name == name
    for name in data.names():
        assert load_config(None, {"data.dataset": name}).data.dataset == name
    for name in data.partition_names():
        assert load_config(None, {"data.partition": name}).data.partition == name
    for name in backends.names():
        assert load_config(None, {"aggregation.backend": name}).aggregation.backend == name
    for name in executors.names():
        assert load_config(None, {"executor.kind": name}).executor.kind == name
    for name in defenses.names("aggregator"):
        assert load_config(None, {"aggregation.defense": name}).aggregation.defense == name
    for name in attacks.names():
        params = {"f": 1} if name == "alie" else {}
        assert load_config(None, {"attack.name": name, "attack.params": params}).attack.name == name


def test_defaults_are_unchanged():
    cfg = Config()
    assert (cfg.model.name, cfg.model.norm) == ("cnn", "group")
    assert (cfg.data.dataset, cfg.data.partition) == ("fashion-mnist", "iid")
    assert (cfg.aggregation.backend, cfg.aggregation.defense) == ("module", "mean")
    assert cfg.aggregation.params == {} and cfg.aggregation.pre == []
    assert cfg.executor.kind == "process"
    assert (cfg.attack.name, cfg.attack.byzantine, cfg.attack.params) == (None, 0, {})
    assert load_config(None, {}) == cfg


def test_aliases_and_case_are_stored_canonically():
    cfg = load_config(None, {"model.name": "CNN", "data.dataset": "Fashion-MNIST", "aggregation.defense": "cc",
                             "aggregation.pre": ["NNM"], "attack.name": "sf", "attack.byzantine": 1})
    assert cfg.model.name == "cnn" and cfg.data.dataset == "fashion-mnist"
    assert cfg.aggregation.defense == "centered_clipping" and cfg.aggregation.pre == ["nnm"]
    assert cfg.attack.name == "sign_flip"
    assert load_config(None, {"aggregation.defense": "average"}).aggregation.defense == "mean"


def test_defense_kind_and_pre_aggregators_are_checked():
    aggregators = _allowed(defenses.names("aggregator"))
    pre = _allowed(defenses.names("preaggregator"))
    assert f"  aggregation.defense: got 'nnm'; allowed: {aggregators}" in _error({"aggregation.defense": "nnm"})
    assert f"  aggregation.pre: got 'krum'; allowed: {pre}" in _error({"aggregation.pre": ["nnm", "krum"]})
    cfg = load_config(None, {"peers.count": 20, "aggregation.defense": "krum", "aggregation.params": {"f": 1},
                             "aggregation.pre": ["bucketing", "nnm"]})
    assert cfg.aggregation.pre == ["bucketing", "nnm"]


def test_bad_defense_parameters_name_the_field_and_the_accepted_ones():
    msg = _error({"aggregation.defense": "krum", "aggregation.params": {"g": 1}})
    assert "  aggregation.params: krum: unknown parameter(s) 'g'; accepted: f, neighbours" in msg.splitlines()
    msg = _error({"aggregation.defense": "krum", "aggregation.params": {"f": -1}})
    assert "aggregation.params: krum: parameter 'f' must be an integer >= 0 (got -1)" in msg
    msg = _error({"aggregation.defense": "centered_clipping", "aggregation.params": {"init": "mean"}})
    assert "aggregation.params: centered_clipping: parameter 'init' must be one of 'median', 'zero'" in msg
    msg = _error({"aggregation.defense": "krum", "aggregation.params": {"neighbours": "n"}})
    assert "aggregation.params: krum: parameter 'neighbours' must be 'n-f-2', 'n-f-1'" in msg


def test_bad_attack_parameters_name_the_field():
    msg = _error({"attack.name": "sign_flip", "attack.params": {"scale": 2.0}})
    assert "  attack.params: sign_flip: parameter 'scale' must be a finite real number < 0.0 (got 2.0)" in msg
    msg = _error({"attack.name": "ipm", "attack.params": {"tau": 2.0}})
    assert "attack.params: ipm: unknown parameter(s) 'tau'; accepted: epsilon" in msg
    assert "attack.params: alie: give exactly one of parameter 'z'" in _error({"attack.name": "alie"})
    assert "attack.params: given without attack.name" in _error({"attack.params": {"scale": -2.0}})
    # the peers add their own seed to an attack that takes one; a seed given here is checked too
    assert "attack.params: gaussian: parameter 'seed' must be" in _error(
        {"attack.name": "gaussian", "attack.params": {"seed": -1}})
    assert load_config(None, {"attack.name": "gaussian", "attack.params": {"sigma": 2.0}}).attack.params == {
        "sigma": 2.0}


def test_every_error_of_a_file_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nname = "vgg"\n[data]\ndataset = "imagenet"\n[executor]\nkind = "k8s"\n'
                   '[aggregation]\ndefense = "krum"\nparams = { q = 1 }\n')
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    lines = str(exc.value).splitlines()
    assert lines[0] == f"invalid configuration in {bad}:"
    fields = [re.match(r"  ([\w.]+):", line).group(1) for line in lines[1:]]
    assert fields == ["model.name", "data.dataset", "aggregation.params", "executor.kind"]


def test_config_round_trips_through_json():
    cfg = load_config(None, {"peers.count": 10, "aggregation.defense": "multi_krum",
                             "aggregation.params": {"f": 2, "neighbours": "n-f-1"}, "aggregation.pre": ["nnm"],
                             "attack.name": "alie", "attack.byzantine": 2, "attack.params": {"f": 2},
                             "data.partition": "dirichlet", "model.name": "mlp", "executor.kind": "inline"})
    again = Config.model_validate_json(cfg.model_dump_json())
    assert again == cfg and again.aggregation.params == {"f": 2, "neighbours": "n-f-1"}


def test_config_follows_the_registries(monkeypatch):
    monkeypatch.setattr(models.registry, "_classes", dict(models.registry._classes))

    @models.register_model("zz_linear")
    def linear(in_channels, num_classes, image_size, norm):
        """A probe model."""
        from torch import nn

        return nn.Linear(in_channels, num_classes)

    assert load_config(None, {"model.name": "zz_linear"}).model.name == "zz_linear"
    assert "'resnet18', 'zz_linear'" in _error({"model.name": "vgg"})
    monkeypatch.undo()
    assert "model.name: got 'zz_linear'" in _error({"model.name": "zz_linear"})


def test_cli_help_names_the_registered_choices():
    flags = cli.RUN_FLAGS
    for flag, names in (("model", models.names()), ("dataset", data.names()),
                        ("partition", data.partition_names()), ("backend", backends.names()),
                        ("executor", executors.names()), ("defense", defenses.names("aggregator")),
                        ("attack", attacks.names())):
        assert ", ".join(names) in flags[flag][2], flag


def test_cli_run_refuses_a_bad_config_before_starting_anything(capsys):
    args = cli.build_parser().parse_args(["run", "--model", "vgg", "--set", "aggregation.params={g = 1}"])
    assert args.func(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "model.name: got 'vgg'; allowed: 'mlp'" in err
    assert "aggregation.params: mean: unknown parameter(s) 'g'; accepted: f" in err


def test_defense_that_cannot_run_with_the_peers_is_refused_at_load_time():
    """Krum needs n > 2f + 2: with 4 peers and f = 1 every aggregation would fail, so the run is refused
    before any process starts, naming the field and the rule's condition."""
    with pytest.raises(ConfigError, match=r"aggregation.defense: krum requires n > 2f \+ 2 \(got n=4, f=1\)"):
        load_config(None, {"peers.count": 4, "aggregation.defense": "krum", "aggregation.params": {"f": 1}})
    assert load_config(None, {"peers.count": 5, "aggregation.defense": "krum",
                              "aggregation.params": {"f": 1}}).aggregation.defense == "krum"
