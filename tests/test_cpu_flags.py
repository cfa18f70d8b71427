"""The XLA:CPU flag of `jaxkd.cpu.use_fast_cpu_defaults`, and imports that
change nothing.

The decision logic is tested in this process on a dict standing in for the
environment; what an import or the call does to a real process is tested in
fresh interpreters (subprocesses), since XLA reads its flags once per process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from jaxkd import cpu as _cpu_flags

VERIFIED = sorted(_cpu_flags.VERIFIED_JAXLIB_VERSIONS)[0]


@pytest.fixture
def fresh(monkeypatch):
  """A verified jaxlib, no backend yet, and no warning issued so far."""
  monkeypatch.setattr(_cpu_flags, "jaxlib_version", lambda: VERIFIED)
  monkeypatch.setattr(_cpu_flags, "backend_initialized", lambda: False)
  monkeypatch.setattr(_cpu_flags, "_warned", set())
  return monkeypatch


# ---------------------------------------------------------------------------
# The decision, on a stand-in environment.
# ---------------------------------------------------------------------------


def test_adds_the_flag_to_an_empty_environment(fresh):
  environ = {}
  assert _cpu_flags.use_fast_cpu_defaults(environ) is True
  assert environ["XLA_FLAGS"] == _cpu_flags.FLAG
  # A second call finds it and changes nothing.
  assert _cpu_flags.use_fast_cpu_defaults(environ) is False
  assert environ["XLA_FLAGS"] == _cpu_flags.FLAG


def test_appends_to_other_flags(fresh):
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  _cpu_flags.use_fast_cpu_defaults(environ)
  assert environ["XLA_FLAGS"] == (
      f"--xla_force_host_platform_device_count=8 {_cpu_flags.FLAG}"
  )


@pytest.mark.parametrize(
    "value",
    [
        "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
        "--xla_cpu_experimental_ynn_fusion_type=",
        "--xla_dump_to=/tmp/x --xla_cpu_experimental_ynn_fusion_type=-"
        "individual_convolution,-individual_dot",
    ],
)
def test_a_user_value_is_left_alone(fresh, value):
  environ = {"XLA_FLAGS": value}
  assert _cpu_flags.use_fast_cpu_defaults(environ) is False
  assert environ == {"XLA_FLAGS": value}


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_opt_out(fresh, value):
  environ = {_cpu_flags.OPT_OUT_VARIABLE: value}
  assert _cpu_flags.use_fast_cpu_defaults(environ) is False
  assert "XLA_FLAGS" not in environ


@pytest.mark.parametrize("value", ["", "0", "false"])
def test_opt_out_off_values_still_apply(fresh, value):
  environ = {_cpu_flags.OPT_OUT_VARIABLE: value}
  assert _cpu_flags.use_fast_cpu_defaults(environ) is True
  assert environ["XLA_FLAGS"] == _cpu_flags.FLAG


@pytest.mark.parametrize("version", ["0.10.1", "0.11.0", None])
def test_unverified_jaxlib_warns_once_and_adds_nothing(fresh, version):
  fresh.setattr(_cpu_flags, "jaxlib_version", lambda: version)
  environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  with pytest.warns(_cpu_flags.CpuFlagsWarning, match="verified on jaxlib"):
    assert _cpu_flags.use_fast_cpu_defaults(environ) is False
  assert environ == {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _cpu_flags.use_fast_cpu_defaults(environ)  # Once: no second warning.


def test_initialised_backend_warns_and_adds_nothing(fresh):
  fresh.setattr(_cpu_flags, "backend_initialized", lambda: True)
  environ = {}
  with pytest.warns(_cpu_flags.CpuFlagsWarning, match="already initialised"):
    assert _cpu_flags.use_fast_cpu_defaults(environ) is False
  assert environ == {}


def test_a_warning_turned_into_an_error_is_logged_instead(fresh, caplog):
  fresh.setattr(_cpu_flags, "jaxlib_version", lambda: "0.0.1")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with caplog.at_level(logging.WARNING, logger=_cpu_flags.__name__):
      assert _cpu_flags.use_fast_cpu_defaults({}) is False
  assert "verified on jaxlib" in caplog.text


def test_backend_check_does_not_import_jax(monkeypatch):
  # Without jax in sys.modules there can be no backend, and the check must
  # not import jax to find out.
  for name in [n for n in sys.modules if n == "jax" or n.startswith("jax.")]:
    monkeypatch.delitem(sys.modules, name)
  assert _cpu_flags.backend_initialized() is False
  assert "jax" not in sys.modules


# ---------------------------------------------------------------------------
# Fresh interpreters.
# ---------------------------------------------------------------------------

_PRELUDE = textwrap.dedent("""
    import json, os, sys, warnings
    warnings.simplefilter("always")
    caught = []
    warnings.showwarning = lambda message, *a, **k: caught.append(str(message))
""")

# Two training steps of a small resnet8; prints the loss and parameter sums.
_TRAIN = _PRELUDE + textwrap.dedent("""
    from jaxkd import cpu
    cpu.use_fast_cpu_defaults()
    import jax, jax.numpy as jnp, numpy as np, optax
    from jaxkd import models, objective, train_step
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((4, 8, 8, 3),
                                                       dtype=np.float32)),
             "label": jnp.asarray(rng.integers(0, 10, 4, dtype=np.int32))}
    spec = train_step.Distillation(
        student=models.create("resnet8", num_classes=10),
        objective=[objective.LabelTerm()],
        optimizer=optax.sgd(0.1, momentum=0.9))
    state = spec.initial_state(jax.random.key(0), batch, (), None)
    step = train_step.make_train_step(spec)
    losses = []
    for _ in range(2):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    leaves = jax.tree.leaves(state.params)
    print(json.dumps({
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "warnings": caught,
        "loss": losses,
        "param_sums": [float(jnp.sum(p)) for p in leaves],
        "param_norms": [float(jnp.sum(p * p)) for p in leaves],
    }))
""")

_IMPORT = _PRELUDE + textwrap.dedent("""
    from jaxkd import cpu
    cpu.use_fast_cpu_defaults()
    import jax.numpy as jnp
    float(jnp.ones(3).sum())  # The backend starts with the flags: no abort.
    print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "warnings": caught}))
""")

# The installed jaxlib pretends to be another version, before jaxkd looks.
_UNVERIFIED = _PRELUDE + textwrap.dedent("""
    import importlib.metadata
    real_version = importlib.metadata.version
    importlib.metadata.version = (
        lambda name: "0.0.1" if name == "jaxlib" else real_version(name))
""") + _IMPORT.replace(_PRELUDE, "")


def _clean_environment(**extra: str) -> dict[str, str]:
  env = {
      k: v for k, v in os.environ.items()
      if k not in ("XLA_FLAGS", _cpu_flags.OPT_OUT_VARIABLE, "JAX_PLATFORMS")
  }
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra)
  return env


@pytest.fixture(scope="module")
def interpreters():
  """Runs the four fresh interpreters at once; returns their JSON output."""
  runs = {
      "default": (_TRAIN, _clean_environment()),
      "opted_out": (
          _TRAIN, _clean_environment(**{_cpu_flags.OPT_OUT_VARIABLE: "1"})
      ),
      "user_value": (
          _IMPORT,
          _clean_environment(
              XLA_FLAGS="--xla_cpu_experimental_ynn_fusion_type=individual_dot"
          ),
      ),
      "unverified": (_UNVERIFIED, _clean_environment()),
  }
  if not _verified():
    # This jaxlib may not know the option at all: XLA would abort.
    del runs["user_value"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  processes = {
      name: subprocess.Popen(
          [sys.executable, "-c", code], env=env, cwd=root,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      )
      for name, (code, env) in runs.items()
  }
  out = {}
  for name, process in processes.items():
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, f"{name} failed:\n{stderr}"
    out[name] = json.loads(stdout.strip().splitlines()[-1])
    out[name]["stderr"] = stderr
  return out


def _verified() -> bool:
  return _cpu_flags.jaxlib_version() in _cpu_flags.VERIFIED_JAXLIB_VERSIONS


def _skip_unless_verified():
  if not _verified():
    pytest.skip("the installed jaxlib is not a verified one")


def test_the_call_applies_the_flag(interpreters):
  _skip_unless_verified()
  assert interpreters["default"]["xla_flags"] == _cpu_flags.FLAG
  assert interpreters["default"]["warnings"] == []


def test_the_call_leaves_a_user_value_alone(interpreters):
  _skip_unless_verified()
  assert interpreters["user_value"]["xla_flags"] == (
      "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
  )
  assert interpreters["user_value"]["warnings"] == []


def test_the_call_respects_the_opt_out(interpreters):
  assert interpreters["opted_out"]["xla_flags"] == ""
  assert interpreters["opted_out"]["warnings"] == []


def test_the_call_with_an_unverified_jaxlib_warns_and_adds_nothing(interpreters):
  result = interpreters["unverified"]
  assert result["xla_flags"] == ""
  assert len(result["warnings"]) == 1
  assert "jaxlib 0.0.1 is installed" in result["warnings"][0]


def test_the_flag_does_not_change_the_numbers(interpreters):
  _skip_unless_verified()
  flagged, plain = interpreters["default"], interpreters["opted_out"]
  assert _cpu_flags.OPTION in flagged["xla_flags"]
  assert _cpu_flags.OPTION not in plain["xla_flags"]
  # Different convolution kernels sum in a different order: equal up to
  # float32 rounding, not bit for bit.
  for key in ("loss", "param_sums", "param_norms"):
    assert len(flagged[key]) == len(plain[key])
    for a, b in zip(flagged[key], plain[key]):
      assert a == pytest.approx(b, rel=1e-4, abs=1e-5), key


# Imports: nothing in the environment changes, and the losses stay light.
_IMPORTS = textwrap.dedent("""
    import json, os, sys
    before = dict(os.environ)
    import jaxkd.losses
    light = sorted(m for m in ("flax", "optax", "orbax", "tensorflow_datasets",
                               "grain") if m in sys.modules)
    import jaxkd
    from jaxkd import Distillation, DistillState, make_train_step
    from jaxkd.methods import mutual
    after = dict(os.environ)
    changed = sorted(k for k in set(before) | set(after)
                     if before.get(k) != after.get(k))
    print(json.dumps({"changed": changed, "heavy_after_losses": light}))
""")


def test_imports_change_no_environment_and_losses_import_only_jax():
  env = _clean_environment()
  for name in ("TF_CPP_MIN_LOG_LEVEL", "TPU_SKIP_MDS_QUERY"):
    env.pop(name, None)
  result = subprocess.run(
      [sys.executable, "-c", _IMPORTS], env=env, capture_output=True,
      text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout.strip().splitlines()[-1])
  # `import jax` itself sets these two; anything else would be ours.
  assert set(out["changed"]) <= {"TF_CPP_MIN_LOG_LEVEL", "TPU_SKIP_MDS_QUERY"}
  assert out["heavy_after_losses"] == []
