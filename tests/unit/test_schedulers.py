"""numpy schedulers against diffusers' (torch, float32): schedules, scaling, and whole loops."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)

from emu_edge.runtime.schedulers import make_scheduler

# diffusers' own np.array(tensor) calls trip numpy 2's copy-keyword deprecation; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DIFFUSERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
SHAPE = (2, 4, 8, 8)
# Our per-step arithmetic is float64 on the same float32 noise table; diffusers' is float32.
# The measured gap over whole loops stays under 2e-6; 1e-5 leaves room for float32
# rounding, not for a wrong coefficient.
REL_TOL = 1e-5


def training_ddpm() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=False,
    )


def ddpm_config_in_memory() -> dict:
    # Carries "_use_default_values": keys DDPM left at default do not reach the target.
    return dict(training_ddpm().config)


def ddpm_config_from_json() -> dict:
    # What save_config writes: no "_use_default_values", so DDPM's "leading" carries over.
    return json.loads(training_ddpm().to_json_string())


SD_LEADING = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    clip_sample=False,
    set_alpha_to_one=False,
    _class_name="PNDMScheduler",
)
SD_TRAILING = {**SD_LEADING, "timestep_spacing": "trailing", "steps_offset": 0}
LINEAR_V_LINSPACE = dict(
    beta_schedule="linear", prediction_type="v_prediction", timestep_spacing="linspace"
)

CONFIGS = {
    "ddpm_in_memory": ddpm_config_in_memory(),
    "ddpm_json": ddpm_config_from_json(),
    "sd_leading": SD_LEADING,
    "sd_trailing": SD_TRAILING,
    "linear_v_linspace": LINEAR_V_LINSPACE,
}
CASES = [(name, cfg, steps) for name in DIFFUSERS for cfg in CONFIGS for steps in (10, 25, 50)]
# Branches only DPM-Solver++ has: Heun's second-order form, a non-zero final sigma with
# second order to the end, sample prediction, first order only.
DPM_EXTRA = {
    "heun_sigma_min": {
        **SD_LEADING,
        "solver_type": "heun",
        "final_sigmas_type": "sigma_min",
        "lower_order_final": False,
    },
    "sample_prediction": {**SD_TRAILING, "prediction_type": "sample"},
    "first_order": {**CONFIGS["ddpm_json"], "solver_order": 1},
    # Under 15 steps lower_order_final makes the last step first order even at sigma_min.
    "sigma_min_lower_final": {**CONFIGS["ddpm_json"], "final_sigmas_type": "sigma_min"},
}
CASES += [("dpm++", cfg, steps) for cfg in DPM_EXTRA for steps in (10, 20)]
ALL_CONFIGS = {**CONFIGS, **DPM_EXTRA}


def fake_unet(x: np.ndarray, t: float, direction: np.ndarray) -> np.ndarray:
    # Deterministic in (x, t) and depends on both, so multistep history actually differs.
    return (np.float32(0.1) * x + np.float32(np.sin(t / 100)) * direction).astype(np.float32)


def rel_err(ours: np.ndarray, theirs: torch.Tensor) -> float:
    theirs = theirs.numpy().astype(np.float64)
    return float(np.abs(ours.astype(np.float64) - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("name,config_name,steps", CASES)
def test_loop_matches_diffusers(name, config_name, steps):
    config = ALL_CONFIGS[config_name]
    ours = make_scheduler(name, config)
    theirs = DIFFUSERS[name].from_config(config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)

    assert ours.timesteps.dtype == (np.float32 if name == "euler" else np.int64)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)

    rng = np.random.default_rng(steps * 1000 + len(config_name))
    direction = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    x_ours = (noise * np.float32(ours.init_noise_sigma)).astype(np.float32)
    x_theirs = torch.from_numpy(noise) * theirs.init_noise_sigma

    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        in_ours = ours.scale_model_input(x_ours, t_ours)
        in_theirs = theirs.scale_model_input(x_theirs, t_theirs)
        assert in_ours.dtype == np.float32
        assert rel_err(in_ours, in_theirs) < REL_TOL

        # The runtime feeds the U-Net a float32 timestep.
        t_unet = float(np.float32(t_ours))
        step_ours = ours.step(fake_unet(in_ours, t_unet, direction), t_ours, x_ours)
        step_theirs = theirs.step(
            torch.from_numpy(fake_unet(in_theirs.numpy(), t_unet, direction)), t_theirs, x_theirs
        )
        err = rel_err(step_ours.prev_sample, step_theirs.prev_sample)
        assert err < REL_TOL, f"step at t={t_ours}: relative error {err:.3g}"
        if name != "dpm++":
            x0_err = rel_err(step_ours.pred_original_sample, step_theirs.pred_original_sample)
            assert x0_err < REL_TOL
        assert step_ours.prev_sample.dtype == np.float32
        x_ours, x_theirs = step_ours.prev_sample, step_theirs.prev_sample


@pytest.mark.parametrize(
    "beta_kwargs",
    [
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="linear"),
        dict(beta_schedule="linear", num_train_timesteps=999),
    ],
)
def test_noise_table_is_bit_identical_to_training(beta_kwargs):
    # The U-Net learned against DDPMScheduler's float32 table; any drift here would show up
    # as a small, sigma-dependent bias in every sample.
    expected = DDPMScheduler(**beta_kwargs).alphas_cumprod.numpy()
    for name in DIFFUSERS:
        np.testing.assert_array_equal(make_scheduler(name, beta_kwargs).alphas_cumprod, expected)


def test_from_config_follows_diffusers_default_rule():
    # A DDPM config held in memory leaves timestep_spacing to the target's default; the same
    # config read back from JSON carries DDPM's "leading".
    assert make_scheduler("euler", ddpm_config_in_memory()).config["timestep_spacing"] == "linspace"
    assert make_scheduler("euler", ddpm_config_from_json()).config["timestep_spacing"] == "leading"
    assert make_scheduler("ddim", ddpm_config_in_memory()).config["clip_sample"] is False


def test_ddim_with_eta_matches_diffusers_given_same_noise():
    config = CONFIGS["ddpm_json"]
    ours, theirs = make_scheduler("ddim", config), DDIMScheduler.from_config(config)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    rng = np.random.default_rng(7)
    direction = rng.standard_normal(SHAPE).astype(np.float32)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    x_theirs = torch.from_numpy(x)
    gen, replay = np.random.default_rng(11), np.random.default_rng(11)
    for t in ours.timesteps:
        x = ours.step(fake_unet(x, float(t), direction), t, x, generator=gen, eta=0.5).prev_sample
        noise = torch.from_numpy(replay.standard_normal(SHAPE).astype(np.float32))
        model_out = torch.from_numpy(fake_unet(x_theirs.numpy(), float(t), direction))
        x_theirs = theirs.step(
            model_out, int(t), x_theirs, eta=0.5, variance_noise=noise
        ).prev_sample
        assert rel_err(x, x_theirs) < REL_TOL


def test_ddim_with_eta_needs_a_generator():
    ddim = make_scheduler("ddim", {})
    ddim.set_timesteps(5)
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    with pytest.raises(ValueError, match="generator"):
        ddim.step(x, ddim.timesteps[0], x, eta=1.0)


def test_trailing_never_yields_a_negative_timestep():
    # np.arange(1000, 0, -1000/61) has 62 entries; diffusers keeps the last (-1), we do not.
    theirs = DDIMScheduler.from_config(SD_TRAILING)
    theirs.set_timesteps(61)
    for name in DIFFUSERS:
        sched = make_scheduler(name, SD_TRAILING)
        sched.set_timesteps(61)
        assert len(sched.timesteps) == 61 and sched.timesteps.min() >= 0
        np.testing.assert_array_equal(sched.timesteps, theirs.timesteps.numpy()[:61])


def test_unknown_scheduler_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"'ddim'.*'dpm\+\+'.*'euler'"):
        make_scheduler("pndm", {})


@pytest.mark.parametrize("name", list(DIFFUSERS))
@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5, True, "10", None])
def test_bad_num_inference_steps(name, bad):
    sched = make_scheduler(name, {"num_train_timesteps": 1000})
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.set_timesteps(bad)


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("ddim", "thresholding", True),
        ("euler", "use_karras_sigmas", True),
        ("dpm++", "algorithm_type", "sde-dpmsolver++"),
        ("dpm++", "solver_order", 3),
        ("dpm++", "variance_type", "learned_range"),
        ("euler", "beta_schedule", "sigmoid"),
        ("ddim", "prediction_type", "flow_prediction"),
        ("ddim", "timestep_spacing", "karras"),
    ],
)
def test_unsupported_config_is_an_error_not_ignored(name, key, value):
    with pytest.raises(ValueError, match=key):
        make_scheduler(name, {key: value})


def test_unknown_keys_are_ignored():
    config = {"_class_name": "DDPMScheduler", "variance_type": "fixed_small", "foo": 1}
    sched = make_scheduler("euler", config)
    assert sched.config["timestep_spacing"] == "linspace"


@pytest.mark.parametrize("name", ["euler", "dpm++"])
def test_stateful_schedulers_reject_out_of_order_timesteps(name):
    sched = make_scheduler(name, CONFIGS["ddpm_json"])
    sched.set_timesteps(3)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    with pytest.raises(ValueError, match="not in this schedule"):
        sched.step(x, np.float32(12345), x)
    sched.set_timesteps(3)
    sched.step(x, sched.timesteps[0], x)
    with pytest.raises(ValueError, match="pass scheduler.timesteps in order"):
        sched.step(x, sched.timesteps[2], x)
    sched.set_timesteps(3)
    for t in sched.timesteps:
        sched.step(x, t, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, sched.timesteps[-1], x)


def test_step_before_set_timesteps_says_what_to_do():
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    for name in DIFFUSERS:
        with pytest.raises(ValueError, match="set_timesteps"):
            make_scheduler(name, {}).step(x, 999, x)


def test_schedulers_module_imports_neither_torch_nor_diffusers():
    code = (
        "import sys, emu_edge.runtime.schedulers\n"
        "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
