"""The diffusers importer against PyTorch: tiny random `UNet2DModel`s saved with
`save_pretrained`, loaded with no torch, compared output for output (max abs difference <= 1e-4
in float32); the scheduler mapping against diffusers' own `alphas_cumprod`; clear errors.

Needs the `diffusers` extra (torch, diffusers); skipped without it.
"""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_mlmc as nm

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = [
    # diffusers and huggingface_hub emit deprecation notices about their own internals (and
    # about configs written by older diffusers versions) that we cannot act on.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:huggingface_hub.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:diffusers.*"),
]

TOLERANCE = 1e-4  # float32: max abs difference over all outputs, the acceptance bound
TIMESTEPS = (0.0, 1.5, 261.0, 999.0)  # integer and fractional diffusers timesteps

_BASE = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
)

# One entry per supported block configuration / option family; together they cover every
# supported block type and option. Each costs one XLA compilation (a few seconds on 2 cores).
CONFIGS = {
    # the DDPM layout (attention in one down and one up block, plain resnet blocks elsewhere,
    # mid block with attention) with google/ddpm-cifar10-32's options: one head, sin-first
    # embedding shifted by 1, asymmetric padding in the downsampling convolution, eps 1e-6
    "ddpm_google_style": dict(
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        freq_shift=1,
        flip_sin_to_cos=False,
        downsample_padding=0,
        norm_eps=1e-6,
    ),
    # scale-shift time conditioning, resnet down/upsampling, attention everywhere, the mid
    # attention without group norm (scale_shift and attn_norm_num_groups=None), a mid scale
    # factor, gelu
    "scale_shift_resnet_resampling": dict(
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        resnet_time_scale_shift="scale_shift",
        downsample_type="resnet",
        upsample_type="resnet",
        mid_block_scale_factor=2**-0.5,
        act_fn="gelu",
        attention_head_dim=16,
    ),
    # mid block without attention, three levels, one channel, centred input, own time
    # embedding width, mish
    "mid_without_attention": dict(
        in_channels=1,
        out_channels=1,
        block_out_channels=(24, 32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        add_attention=False,
        center_input_sample=True,
        time_embedding_dim=40,
        act_fn="mish",
        attention_head_dim=None,
    ),
    # no mid block at all, two resnets per block, attention groups set explicitly, heads of
    # the default dim 8
    "no_mid_block": dict(
        mid_block_type=None,
        layers_per_block=2,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        attn_norm_num_groups=4,
    ),
}


@eqx.filter_jit
def _jitted_apply(network, x, t):
    return jax.vmap(network, in_axes=(0, None))(x, t)


def _apply(network, x, t):
    """`network(x, t)` over a batch `x`, jitted with the network's weights and `t` as traced
    arguments: one compilation per architecture, shared by the tests (a Python float `t` would
    be static under `filter_jit` and recompile per value)."""
    return _jitted_apply(network, jnp.asarray(x), jnp.asarray(t, jnp.float32))


def _unet(seed=0, **overrides):
    config = {**_BASE, **overrides}
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():  # diffusers' init sets norms to (1, 0): move every weight off it
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _save(tmp_path, model, scheduler=None, name="model"):
    path = tmp_path / name
    model.save_pretrained(path)
    scheduler = diffusers.DDPMScheduler() if scheduler is None else scheduler
    scheduler.save_pretrained(path / "scheduler")
    return path


def _torch_output(model, x, timestep):
    t = torch.full((x.shape[0],), float(timestep), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.from_numpy(x), t).sample.numpy()


def _inputs(model, seed=1, batch=2):
    c, s = model.config.in_channels, model.config.sample_size
    return np.random.default_rng(seed).standard_normal((batch, c, s, s)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unet_matches_pytorch(tmp_path, name):
    model = _unet(**CONFIGS[name])
    unet = nm.load_diffusers_unet(_save(tmp_path, model))
    x = _inputs(model)
    for timestep in TIMESTEPS:
        expected = _torch_output(model, x, timestep)
        got = np.asarray(_apply(unet, jnp.asarray(x), timestep))
        assert got.shape == expected.shape
        err = np.max(np.abs(got - expected))
        assert err <= TOLERANCE, f"{name}, timestep {timestep}: max abs diff {err:.2e}"


def test_prior_denoiser_maps_time_and_learned_variance_channels(tmp_path):
    # a model with learned variances returns 2 C channels; the denoiser keeps the first C
    model = _unet(out_channels=6)
    scheduler = diffusers.DDPMScheduler(variance_type="learned_range")
    prior = nm.DiffusionPrior.from_diffusers(_save(tmp_path, model, scheduler))
    assert prior.event_shape == (3, 8, 8)
    assert prior.parametrization == "eps"
    schedule = prior.schedule
    assert isinstance(schedule, nm.DiscreteVPSchedule)
    n = schedule.num_train_timesteps
    x = _inputs(model)
    # continuous time t = (k + 1) / N is diffusers timestep k; below 1 / N, timestep 0
    for k, t in ((0, 0.25 / n), (0, 1 / n), (99, 0.1), (n - 1, 1.0)):
        assert k == pytest.approx(n * t - 1) or t < 1 / n
        got = np.asarray(_apply(prior.denoiser, jnp.asarray(x), t))
        assert got.shape == (2, 3, 8, 8)
        err = np.max(np.abs(got - _torch_output(model, x, k)[:, :3]))
        assert err <= TOLERANCE, f"t={t}: max abs diff {err:.2e}"
    assert schedule.time_at_timestep(499) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="learned variance_type"):
        nm.DiffusionPrior.from_diffusers(_save(tmp_path, model, name="fixed"))


def test_pipeline_layout_and_deprecated_attention_names(tmp_path):
    from safetensors.numpy import load_file, save_file

    model = _unet(seed=3, **CONFIGS["ddpm_google_style"])
    path = tmp_path / "pipeline"
    diffusers.DDPMPipeline(unet=model, scheduler=diffusers.DDIMScheduler()).save_pretrained(path)
    # Checkpoints from diffusers < 0.14 name the attention projections query/key/value/proj_attn.
    weights = path / "unet" / "diffusion_pytorch_model.safetensors"
    old = {
        k.replace(".to_q.", ".query.")
        .replace(".to_k.", ".key.")
        .replace(".to_v.", ".value.")
        .replace(".to_out.0.", ".proj_attn."): v
        for k, v in load_file(str(weights)).items()
    }
    assert any(".proj_attn." in k for k in old)
    save_file(old, str(weights))
    prior = nm.DiffusionPrior.from_diffusers(path)
    x = _inputs(model)
    got = np.asarray(_apply(prior.denoiser.unet, jnp.asarray(x), 499.0))
    assert np.max(np.abs(got - _torch_output(model, x, 499.0))) <= TOLERANCE


# ---------------------------------------------------------------------------------------------
# Schedules


SCHEDULES = [
    ("DDPMScheduler", dict(beta_schedule="linear")),
    ("DDPMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
    ("DDPMScheduler", dict(beta_schedule="squaredcos_cap_v2")),
    ("DDPMScheduler", dict(beta_schedule="sigmoid", num_train_timesteps=500)),
    ("DDIMScheduler", dict(beta_schedule="linear", num_train_timesteps=250)),
    ("DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")),
    ("DDPMScheduler", dict(trained_betas=np.linspace(1e-3, 0.05, 100).tolist())),
]


@eqx.filter_jit
def _schedule_values(schedule, times):
    mid = times - 0.5 / schedule.num_train_timesteps
    r, _ = jax.vmap(schedule.transition)(times[1:], times[:-1])
    minus_slope = jax.vmap(jax.grad(lambda t: -schedule.log_alpha_bar(t)))(mid)
    return schedule.alpha_bar(times), r, schedule.beta(mid), minus_slope


@pytest.mark.parametrize("cls, kwargs", SCHEDULES)
def test_schedule_reproduces_alphas_cumprod(cls, kwargs):
    scheduler = getattr(diffusers, cls)(**kwargs)
    config = json.loads(scheduler.to_json_string())
    schedule, parametrization = nm.schedule_from_diffusers(config)
    expected = scheduler.alphas_cumprod.numpy().astype(np.float64)
    n = expected.size
    assert schedule.num_train_timesteps == n
    # diffusers computes in float32 torch, we in numpy: equal to float32 rounding
    np.testing.assert_allclose(schedule.alphas_cumprod, expected, rtol=2e-6, atol=0)
    # in continuous time, jitted in float32: alpha_bar((k + 1) / N) = alphas_cumprod[k]
    times = jnp.arange(1, n + 1, dtype=jnp.float32) / n
    got, r, beta, minus_slope = _schedule_values(schedule, times)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=1e-7)
    # one DDPM step k-1 -> k is the scheduler's alpha_k = 1 - beta_k. Float32 times carry an
    # error of up to 2^-24 in t, i.e. N 2^-24 timesteps, which moves log alpha_bar at a knot by
    # that much times the slope |log alpha| of a neighbouring segment (large at the capped end
    # of the cosine schedule).
    all_log_alphas = np.log(scheduler.alphas.numpy().astype(np.float64))
    slope = np.abs(np.concatenate([all_log_alphas, all_log_alphas[-1:]]))
    slope = np.maximum(np.maximum(slope[:-2], slope[1:-1]), slope[2:])
    bound = 2 * n * 2.0**-24 * slope + 1e-5
    error = np.abs(2 * np.log(np.asarray(r, np.float64)) - all_log_alphas[1:])
    assert np.all(error <= bound)
    # beta is -d log alpha_bar / dt (mid-segment), and time_at_alpha_bar inverts alpha_bar
    np.testing.assert_allclose(np.asarray(beta), np.asarray(minus_slope), rtol=1e-4)
    for k in (0, n // 3, n - 1):
        assert schedule.time_at_alpha_bar(expected[k]) == pytest.approx((k + 1) / n, rel=1e-6)
    expected_param = {"epsilon": "eps", "v_prediction": "v"}[config["prediction_type"]]
    assert parametrization == expected_param


def test_sample_prediction_maps_to_x0():
    config = json.loads(diffusers.DDPMScheduler(prediction_type="sample").to_json_string())
    assert nm.schedule_from_diffusers(config)[1] == "x0"


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(_class_name="ScoreSdeVeScheduler"), "ScoreSdeVeScheduler"),
        (dict(beta_schedule="laplace"), "laplace"),
        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
        (dict(prediction_type="flow"), "prediction_type"),
    ],
)
def test_unsupported_scheduler_configs(config, match):
    with pytest.raises(ValueError, match=match):
        nm.schedule_from_diffusers(config)


def test_discrete_schedule_rejects_bad_tables():
    with pytest.raises(ValueError, match="non-increasing"):
        nm.DiscreteVPSchedule([0.9, 0.95])
    with pytest.raises(ValueError, match="zero terminal SNR"):
        nm.DiscreteVPSchedule([0.9, 0.0])
    schedule = nm.DiscreteVPSchedule([0.9, 0.5, 0.1])
    with pytest.raises(ValueError, match="larger than the model was trained on"):
        schedule.time_at_alpha_bar(0.05)


# ---------------------------------------------------------------------------------------------
# Errors


def _write_config(path, **overrides):
    path.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "UNet2DModel", **_BASE, **overrides}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "overrides, names",
    [
        (
            dict(
                down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                up_block_types=("SkipUpBlock2D", "UpBlock2D"),
                time_embedding_type="fourier",
            ),
            ["SkipDownBlock2D", "AttnSkipDownBlock2D", "SkipUpBlock2D", "fourier"],
        ),
        (dict(mid_block_type="UNetMidBlock2DCrossAttn"), ["UNetMidBlock2DCrossAttn"]),
        (dict(num_class_embeds=10), ["class conditioning"]),
        (dict(_class_name="UNet2DConditionModel"), ["UNet2DConditionModel"]),
        (dict(resnet_time_scale_shift="spatial"), ["spatial"]),
        (dict(act_fn="tanh"), ["tanh"]),
    ],
)
def test_unsupported_unet_configs_are_named(tmp_path, overrides, names):
    path = _write_config(tmp_path / "m", **overrides)
    with pytest.raises(ValueError) as info:
        nm.load_diffusers_unet(path)
    for name in names:
        assert name in str(info.value)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        nm.DiffusionPrior.from_diffusers(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        nm.DiffusionPrior.from_diffusers(tmp_path / "empty")
    path = _write_config(tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        nm.load_diffusers_unet(path)
    (path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safe_serialization=True"):
        nm.load_diffusers_unet(path)
    model = _unet()
    path = tmp_path / "no_scheduler"
    model.save_pretrained(path)
    with pytest.raises(FileNotFoundError, match="scheduler_config"):
        nm.DiffusionPrior.from_diffusers(path)
    # an explicit scheduler config (dict or file) fills the gap
    scheduler = diffusers.DDIMScheduler(prediction_type="sample")
    prior = nm.DiffusionPrior.from_diffusers(path, scheduler_config=dict(scheduler.config))
    assert prior.parametrization == "x0"
    scheduler.save_pretrained(tmp_path / "sched")
    prior = nm.DiffusionPrior.from_diffusers(path, scheduler_config=tmp_path / "sched")
    assert prior.parametrization == "x0"


def test_mismatched_weights(tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _save(tmp_path, _unet())
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 48]}))
    with pytest.raises(ValueError, match=r"shape other than the config implies: .*48"):
        nm.load_diffusers_unet(path)
    (path / "config.json").write_text(json.dumps(config))
    weights = path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["extra.weight"] = state.pop("conv_in.weight")
    save_file(state, str(weights))
    with pytest.raises(ValueError) as info:
        nm.load_diffusers_unet(path)
    assert "missing: conv_in.weight" in str(info.value)
    assert "unexpected: extra.weight" in str(info.value)


def test_event_shape_checks(tmp_path):
    path = _save(tmp_path, _unet())
    prior = nm.DiffusionPrior.from_diffusers(path, event_shape=(3, 16, 24), num_steps=8)
    assert prior.event_shape == (3, 16, 24)
    with pytest.raises(ValueError, match="multiples of 2"):
        nm.DiffusionPrior.from_diffusers(path, event_shape=(3, 9, 8))
    with pytest.raises(ValueError, match="C=3"):
        nm.DiffusionPrior.from_diffusers(path, event_shape=(1, 8, 8))


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def imported_prior(tmp_path_factory):
    path = _save(tmp_path_factory.mktemp("e2e"), _unet(**CONFIGS["ddpm_google_style"]))
    return nm.DiffusionPrior.from_diffusers(path, num_steps=4)


def test_imported_prior_samples(imported_prior):
    draws = imported_prior.sample(jr.key(0), (2,))
    assert draws.shape == (2, 3, 8, 8)
    assert np.all(np.isfinite(np.asarray(draws)))


@pytest.mark.slow  # compiles DPS guidance (a vector-Jacobian product through the UNet)
def test_imported_prior_in_a_diffusion_posterior(imported_prior):
    mask = np.zeros((3, 8, 8), dtype=bool)
    mask[:, :, :4] = True  # observe the left half

    def model(y=None):
        x = numpyro.sample("x", imported_prior)
        numpyro.sample("y", dist.Normal(x[mask], 0.1).to_event(1), obs=y)

    y = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, size=int(mask.sum())), jnp.float32)
    kernel = nm.DiffusionPosterior(model, num_steps=4, guidance="dps")
    draws = nm.sample_posterior(jr.key(1), kernel, 3, batch_size=2, y=y)
    assert draws["x"].shape == (3, 3, 8, 8)
    assert np.all(np.isfinite(draws["x"]))
