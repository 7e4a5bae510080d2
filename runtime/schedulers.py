"""Diffusion schedulers in numpy with the diffusers interface: DDIM, Euler, DPM-Solver++ 2M.

The caller writes the denoising loop, so it stays visible:

    scheduler = make_scheduler("dpm++", manifest["scheduler"])
    scheduler.set_timesteps(25)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        eps = unet(model_input, np.float32(t), context)
        latents = scheduler.step(eps, t, latents).prev_sample

Each class takes the keyword config that diffusers' class of the same name takes (unknown
keys are ignored, as `from_config` of another scheduler's config needs), and follows
diffusers' timestep choices exactly, so a bundle denoises here as it does in a diffusers
pipeline. The noise table is built the way diffusers builds it in float32, because that is
the table the U-Net was trained against; per-step arithmetic then runs in float64 and the
result is cast back to the sample's dtype.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class SchedulerOutput:
    prev_sample: np.ndarray
    pred_original_sample: np.ndarray | None = None


def _torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    # torch.linspace(dtype=float32) rounds the step to float32 and fills from both ends
    # with a single rounding per element; np.linspace differs by one ulp in ~1/3 of the
    # entries. Mirroring it keeps the noise table bit-identical to the training side.
    if steps == 1:
        return np.array([start], dtype=np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    index = np.arange(steps, dtype=np.float64)
    from_start = np.float64(start32) + np.float64(step) * index
    from_end = np.float64(end32) - np.float64(step) * (steps - 1 - index)
    return np.where(index < steps // 2, from_start, from_end).astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal's squared-cosine alpha_bar, discretised as 1 - abar(t2) / abar(t1).
    t = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    alpha_bar = np.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta).astype(np.float32)


def _alphas_cumprod(config: dict) -> np.ndarray:
    """The [num_train_timesteps] table of alpha_bar_t, as float32 values held in float64."""
    train_steps = config["num_train_timesteps"]
    start, end = config["beta_start"], config["beta_end"]
    if config["trained_betas"] is not None:
        betas = np.asarray(config["trained_betas"], dtype=np.float32)
    elif config["beta_schedule"] == "linear":
        betas = _torch_linspace_float32(start, end, train_steps)
    elif config["beta_schedule"] == "scaled_linear":
        betas = _torch_linspace_float32(start**0.5, end**0.5, train_steps) ** 2
    else:
        betas = _cosine_betas(train_steps)
    # torch's float32 cumprod accumulates in float64 and rounds once at the end.
    alphas = (np.float32(1.0) - betas).astype(np.float64)
    return np.cumprod(alphas).astype(np.float32).astype(np.float64)


def _check_choice(owner: str, key: str, value, choices: tuple):
    if value not in choices:
        raise ValueError(f"{owner}: {key} must be one of {choices}, got {value!r}")


def _check_common(owner: str, config: dict):
    train_steps = config["num_train_timesteps"]
    if not _is_int(train_steps) or train_steps < 1:
        raise ValueError(
            f"{owner}: num_train_timesteps must be a positive integer, got {train_steps!r}"
        )
    _check_choice(owner, "beta_schedule", config["beta_schedule"], BETA_SCHEDULES)
    _check_choice(owner, "prediction_type", config["prediction_type"], PREDICTION_TYPES)
    _check_choice(owner, "timestep_spacing", config["timestep_spacing"], TIMESTEP_SPACINGS)


def _check_unsupported(owner: str, ignored: dict, only_allowed: dict):
    # Keys we do not implement are fine at their neutral value (a DDPM config carries
    # thresholding=False, for instance); anything else would silently change the result.
    for key, allowed in only_allowed.items():
        if key in ignored and ignored[key] != allowed:
            raise ValueError(
                f"{owner}: config {key}={ignored[key]!r} is not supported by the numpy runtime "
                f"(only {allowed!r}); use a scheduler config without it"
            )


def _check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> int:
    if (
        not _is_int(num_inference_steps)
        or num_inference_steps < 1
        or num_inference_steps > num_train_timesteps
    ):
        raise ValueError(
            "num_inference_steps must be an integer in "
            f"[1, num_train_timesteps={num_train_timesteps}], got {num_inference_steps!r}"
        )
    return int(num_inference_steps)


def _trailing_timesteps(start: int, num_train_timesteps: int, num_inference_steps: int):
    # Same float arange as diffusers so the rounding matches; float arange can overshoot by
    # one element (a bogus timestep -1, e.g. 61 steps of 1000), which diffusers keeps and
    # we drop.
    ratio = num_train_timesteps / num_inference_steps
    timesteps = np.round(np.arange(start, 0, -ratio)).astype(np.int64) - 1
    return timesteps[:num_inference_steps]


def _kwargs_from_config(config: dict) -> dict:
    # Like diffusers' from_config: keys the source scheduler only held at its own default
    # (listed in "_use_default_values") do not carry over, so the target's defaults apply;
    # private keys ("_class_name", ...) never do.
    defaulted = set(config.get("_use_default_values", ()))
    return {k: v for k, v in config.items() if k not in defaulted and not k.startswith("_")}


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


class _StepCounter:
    """Which entry of `timesteps` a stateful scheduler is at.

    Like diffusers, the first call finds the given timestep in the schedule (so a loop may
    start part-way, as image-to-image does) and `step` advances by one. Unlike diffusers, a
    timestep that is not the one expected is an error rather than silently ignored.
    """

    def __init__(self, timesteps: np.ndarray):
        self.timesteps = timesteps
        self.index: int | None = None

    def current(self, timestep) -> int:
        if self.index is None:
            matches = np.flatnonzero(self.timesteps == timestep)
            if matches.size == 0:
                raise ValueError(
                    f"timestep {timestep!r} is not in this schedule; "
                    "pass values from scheduler.timesteps"
                )
            self.index = int(matches[0])
        if self.index >= len(self.timesteps):
            raise ValueError(
                "the schedule is finished; call set_timesteps() before a new denoising loop"
            )
        expected = self.timesteps[self.index]
        if expected != timestep:
            raise ValueError(
                f"step {self.index} of the schedule is timestep {expected!r}, got {timestep!r}; "
                "pass scheduler.timesteps in order and call set_timesteps() before each new loop"
            )
        return self.index


class DDIMScheduler:
    """DDIM (Song et al., 2020), deterministic for eta=0; diffusers' DDIMScheduler."""

    _UNSUPPORTED = {"thresholding": False, "rescale_betas_zero_snr": False}

    def __init__(
        self,
        *,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        **ignored,
    ):
        name = type(self).__name__
        _check_unsupported(name, ignored, self._UNSUPPORTED)
        self.config = dict(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
            clip_sample_range=clip_sample_range, set_alpha_to_one=set_alpha_to_one,
            steps_offset=steps_offset, prediction_type=prediction_type,
            timestep_spacing=timestep_spacing,
        )
        _check_common(name, self.config)
        self.alphas_cumprod = _alphas_cumprod(self.config)
        # The last step lands on "t = -1", which has no table entry: either clean (1.0)
        # or the first entry, as the config says.
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=np.int64)

    @classmethod
    def from_config(cls, config: dict) -> DDIMScheduler:
        return cls(**_kwargs_from_config(config))

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        train_steps = cfg["num_train_timesteps"]
        n = _check_num_inference_steps(num_inference_steps, train_steps)
        if cfg["timestep_spacing"] == "linspace":
            timesteps = np.linspace(0, train_steps - 1, n).round()[::-1].astype(np.int64)
        elif cfg["timestep_spacing"] == "leading":
            ratio = train_steps // n
            timesteps = np.arange(n - 1, -1, -1, dtype=np.int64) * ratio + cfg["steps_offset"]
        else:
            timesteps = _trailing_timesteps(train_steps, train_steps, n)
        self.num_inference_steps = n
        self.timesteps = timesteps

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
        eta: float = 0.0,
    ) -> SchedulerOutput:
        """One DDIM update x_t -> x_{t_prev}. `eta > 0` adds noise drawn from `generator`."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        cfg = self.config
        train_steps = cfg["num_train_timesteps"]
        t = int(timestep)
        if t != timestep or not 0 <= t < train_steps:
            raise ValueError(f"timestep must be an integer in [0, {train_steps}), got {timestep!r}")
        # diffusers steps back by num_train_timesteps // num_inference_steps whatever the
        # spacing; kept so "linspace"/"trailing" schedules denoise exactly as there.
        t_prev = t - train_steps // self.num_inference_steps
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod

        x = sample.astype(np.float64)
        out = model_output.astype(np.float64)
        # (12) in the DDIM paper: predicted x_0 and the noise it implies.
        if cfg["prediction_type"] == "epsilon":
            x0 = (x - math.sqrt(1 - alpha_t) * out) / math.sqrt(alpha_t)
            eps = out
        elif cfg["prediction_type"] == "v_prediction":
            x0 = math.sqrt(alpha_t) * x - math.sqrt(1 - alpha_t) * out
            eps = math.sqrt(alpha_t) * out + math.sqrt(1 - alpha_t) * x
        else:
            x0 = out
            eps = (x - math.sqrt(alpha_t) * x0) / math.sqrt(1 - alpha_t)
        if cfg["clip_sample"]:
            # eps is deliberately not recomputed from the clipped x_0, as in diffusers' default.
            x0 = np.clip(x0, -cfg["clip_sample_range"], cfg["clip_sample_range"])

        # (16): sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
        std = eta * math.sqrt((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev))
        # (12): x_prev = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
        prev = math.sqrt(alpha_prev) * x0 + math.sqrt(1 - alpha_prev - std**2) * eps
        if eta > 0:
            if generator is None:
                raise ValueError(
                    "DDIM with eta > 0 needs noise: pass generator=np.random.default_rng(seed)"
                )
            prev = prev + std * generator.standard_normal(sample.shape)
        return SchedulerOutput(
            prev_sample=prev.astype(sample.dtype), pred_original_sample=x0.astype(sample.dtype)
        )


class EulerDiscreteScheduler:
    """Euler's method on the probability-flow ODE in sigma space (Karras et al., 2022, Alg. 2
    without churn); diffusers' EulerDiscreteScheduler."""

    _UNSUPPORTED = {
        "rescale_betas_zero_snr": False,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "timestep_type": "discrete",
    }

    def __init__(
        self,
        *,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        **ignored,
    ):
        name = type(self).__name__
        _check_unsupported(name, ignored, self._UNSUPPORTED)
        _check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        self.config = dict(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas,
            prediction_type=prediction_type, timestep_spacing=timestep_spacing,
            steps_offset=steps_offset, final_sigmas_type=final_sigmas_type,
        )
        _check_common(name, self.config)
        self.alphas_cumprod = _alphas_cumprod(self.config)
        # Variance-exploding sigma of each training timestep: x_t / sqrt(a_t) = x_0 + sigma_t * eps.
        self.train_sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=np.float32)
        self.sigmas = np.append(self.train_sigmas[::-1], 0.0)
        self._counter = _StepCounter(self.timesteps)

    @classmethod
    def from_config(cls, config: dict) -> EulerDiscreteScheduler:
        return cls(**_kwargs_from_config(config))

    @property
    def init_noise_sigma(self) -> float:
        max_sigma = float(self.sigmas.max())
        if self.config["timestep_spacing"] == "leading":
            # diffusers' choice for "leading": the std of x_0 + sigma * eps with unit x_0.
            return math.sqrt(max_sigma**2 + 1)
        return max_sigma

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        train_steps = cfg["num_train_timesteps"]
        n = _check_num_inference_steps(num_inference_steps, train_steps)
        if cfg["timestep_spacing"] == "linspace":
            # Fractional timesteps: the U-Net sees them as float32, and sigma is
            # interpolated between training timesteps.
            timesteps = np.linspace(0, train_steps - 1, n, dtype=np.float32)[::-1].copy()
        elif cfg["timestep_spacing"] == "leading":
            ratio = train_steps // n
            timesteps = (np.arange(n - 1, -1, -1) * ratio + cfg["steps_offset"]).astype(np.float32)
        else:
            timesteps = _trailing_timesteps(train_steps, train_steps, n).astype(np.float32)
        sigmas = np.interp(timesteps.astype(np.float64), np.arange(train_steps), self.train_sigmas)
        last = 0.0 if cfg["final_sigmas_type"] == "zero" else self.train_sigmas[0]
        self.num_inference_steps = n
        self.timesteps = timesteps
        self.sigmas = np.append(sigmas, last)  # [n + 1], the last is where the loop ends
        self._counter = _StepCounter(timesteps)

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        # The U-Net was trained on x_t = sqrt(a) x_0 + sqrt(1 - a) eps, which is the
        # sigma-space sample divided by sqrt(sigma^2 + 1).
        sigma = self.sigmas[self._counter.current(timestep)]
        return (sample.astype(np.float64) / math.sqrt(sigma**2 + 1)).astype(sample.dtype)

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
    ) -> SchedulerOutput:
        """One Euler step from sigmas[i] to sigmas[i + 1]; deterministic (`generator` unused)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        i = self._counter.current(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = sample.astype(np.float64)
        out = model_output.astype(np.float64)
        if self.config["prediction_type"] == "epsilon":
            x0 = x - sigma * out
        elif self.config["prediction_type"] == "v_prediction":
            x0 = out * (-sigma / math.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
        else:
            x0 = out
        derivative = (x - x0) / sigma  # dx/dsigma of the probability-flow ODE
        prev = x + derivative * (sigma_next - sigma)
        self._counter.index += 1
        return SchedulerOutput(
            prev_sample=prev.astype(sample.dtype), pred_original_sample=x0.astype(sample.dtype)
        )


class DPMSolverMultistepScheduler:
    """DPM-Solver++ (Lu et al., 2022) in its multistep form, 2M by default: a data-prediction
    solver that reuses the previous step's x_0 estimate for second order;
    diffusers' DPMSolverMultistepScheduler with algorithm_type="dpmsolver++"."""

    _UNSUPPORTED = {
        "thresholding": False,
        "rescale_betas_zero_snr": False,
        "use_karras_sigmas": False,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
    }

    def __init__(
        self,
        *,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -math.inf,
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        **ignored,
    ):
        name = type(self).__name__
        _check_unsupported(name, ignored, self._UNSUPPORTED)
        _check_choice(name, "algorithm_type", algorithm_type, ("dpmsolver++",))
        _check_choice(name, "solver_order", solver_order, (1, 2))
        _check_choice(name, "solver_type", solver_type, ("midpoint", "heun"))
        _check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        if variance_type in ("learned", "learned_range"):
            raise ValueError(
                f"{name}: variance_type={variance_type!r} (a U-Net that also predicts its "
                "variance) is not supported; the runtime expects a fixed-variance model"
            )
        self.config = dict(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, solver_order=solver_order,
            prediction_type=prediction_type, algorithm_type=algorithm_type, solver_type=solver_type,
            lower_order_final=lower_order_final, euler_at_final=euler_at_final,
            final_sigmas_type=final_sigmas_type, lambda_min_clipped=lambda_min_clipped,
            timestep_spacing=timestep_spacing, steps_offset=steps_offset,
        )
        _check_common(name, self.config)
        self.alphas_cumprod = _alphas_cumprod(self.config)
        # Variance-exploding sigma per training timestep; the solver's half-log-SNR is
        # lambda = -log(sigma).
        self.train_sigmas = np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.sigmas = np.zeros(0)
        self._counter = _StepCounter(self.timesteps)
        self._prev_x0: np.ndarray | None = None

    @classmethod
    def from_config(cls, config: dict) -> DPMSolverMultistepScheduler:
        return cls(**_kwargs_from_config(config))

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        train_steps = cfg["num_train_timesteps"]
        n = _check_num_inference_steps(num_inference_steps, train_steps)
        # lambda_min_clipped drops the noisiest training timesteps (lambda falls as t rises).
        lambdas = -np.log(self.train_sigmas)
        last = train_steps - int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
        if cfg["timestep_spacing"] == "linspace":
            # n + 1 points from 0 to last - 1, dropping the t = 0 end.
            timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif cfg["timestep_spacing"] == "leading":
            ratio = last // (n + 1)
            timesteps = np.arange(n, 0, -1, dtype=np.int64) * ratio + cfg["steps_offset"]
        else:
            timesteps = _trailing_timesteps(last, train_steps, n)
        sigmas = np.interp(timesteps.astype(np.float64), np.arange(train_steps), self.train_sigmas)
        final = 0.0 if cfg["final_sigmas_type"] == "zero" else self.train_sigmas[0]
        self.num_inference_steps = len(timesteps)
        self.timesteps = timesteps
        self.sigmas = np.append(sigmas, final)  # [n + 1]
        self._counter = _StepCounter(timesteps)
        self._prev_x0 = None

    def scale_model_input(self, sample: np.ndarray, timestep=None) -> np.ndarray:
        return sample

    def _predict_x0(self, model_output: np.ndarray, sample: np.ndarray, sigma: float) -> np.ndarray:
        alpha_t = 1 / math.sqrt(sigma**2 + 1)  # VP scale: x_t = alpha_t x_0 + sigma_t eps
        sigma_t = sigma * alpha_t
        if self.config["prediction_type"] == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if self.config["prediction_type"] == "v_prediction":
            return alpha_t * sample - sigma_t * model_output
        return model_output

    def step(
        self,
        model_output: np.ndarray,
        timestep,
        sample: np.ndarray,
        generator: np.random.Generator | None = None,
    ) -> SchedulerOutput:
        """One DPM-Solver++ step from sigmas[i] to sigmas[i + 1]; deterministic (`generator`
        unused)."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        cfg = self.config
        i = self._counter.current(timestep)
        s_cur, s_next = self.sigmas[i], self.sigmas[i + 1]
        x = sample.astype(np.float64)
        x0 = self._predict_x0(model_output.astype(np.float64), x, s_cur)

        # The last step drops to first order when it ends at sigma = 0 (the second-order
        # correction needs a finite lambda there) or when the config asks for it.
        is_last = i == len(self.timesteps) - 1
        first_order = (
            cfg["solver_order"] == 1
            or self._prev_x0 is None
            or (
                is_last
                and (
                    cfg["euler_at_final"]
                    or (cfg["lower_order_final"] and len(self.timesteps) < 15)
                    or cfg["final_sigmas_type"] == "zero"
                )
            )
        )

        # With lambda = -log(sigma_VE): exp(-h) = s_next / s_cur, and the VP quantities are
        # alpha = 1 / sqrt(1 + s^2), sigma_VP = s * alpha.
        alpha_next = 1 / math.sqrt(s_next**2 + 1)
        alpha_cur = 1 / math.sqrt(s_cur**2 + 1)
        exp_neg_h = s_next / s_cur
        # First order (= DDIM): x_next = sigma_next / sigma_cur x - alpha_next (e^-h - 1) D0
        prev = (s_next * alpha_next) / (s_cur * alpha_cur) * x + alpha_next * (1 - exp_neg_h) * x0
        if not first_order:
            # 2M: D1 is the finite difference of x_0 over lambda, scaled to this step's h.
            s_prev = self.sigmas[i - 1]
            h = math.log(s_cur / s_next)
            h_prev = math.log(s_prev / s_cur)
            d1 = (x0 - self._prev_x0) * (h / h_prev)
            if cfg["solver_type"] == "midpoint":
                prev = prev + 0.5 * alpha_next * (1 - exp_neg_h) * d1
            else:
                prev = prev + alpha_next * ((exp_neg_h - 1) / h + 1) * d1
        self._prev_x0 = x0
        self._counter.index += 1
        return SchedulerOutput(prev_sample=prev.astype(sample.dtype))


SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}


def make_scheduler(name: str, config: dict):
    """Build the named scheduler from a diffusers scheduler config (e.g. training's DDPM one)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)


def initial_noise(seed: int, shape) -> np.ndarray:
    """The starting latents of a denoising loop. numpy draws them for the runtime and the
    PyTorch reference alike, so one seed gives one image on both."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
