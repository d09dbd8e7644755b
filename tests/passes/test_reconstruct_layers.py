"""ReconstructLayersPass: closed-form refits on the calibration activations, layer by layer."""
import pytest
import torch

import fxprune
from fxprune.data.calibration import Calibration
from fxprune.reconstruction.reconstruct_layers import ReconstructLayersPass
from fxprune.reconstruction.projections import Projection
from fxprune.reconstruction.settings import Refit
from fxprune.rewrite.emit import rewrite
from models import llama
from oracles import inputs, module_inputs, random_scores, rel_err, zero_masked

CAL = torch.randint(1, 128, (24, 12), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def setup():
    model = llama("sdpa")
    dg = fxprune.analyze(model)
    return model, dg


_CACHE = {}


def pruned(setup, mode, ridge=0.0, targets=("mlp",), ratio=0.3, calibration=CAL, weighting="uniform", target="stream",
           precision="float32"):
    """(plan, pruned gm), made once per setting: the tests only read them."""
    key = (mode, ridge, targets, ratio, calibration.shape, weighting, target, precision)
    if key not in _CACHE:
        model, dg = setup
        plan = fxprune.plan(model, ratio, targets=targets, scores=random_scores(dg, 1), dg=dg, allocation="global",
                            reconstruct=Refit(mode=mode, ridge=ridge, weighting=weighting, target=target,
                                              precision=precision), calibration=calibration)
        _CACHE[key] = plan, fxprune.apply(model, plan, calibration=calibration, dg=dg)
    return _CACHE[key]


def dense_io(model, layer):
    proj = model.model.layers[layer].mlp.down_proj
    x = module_inputs(proj, lambda: model(CAL))
    return x, x @ proj.weight.detach().t()


def closed_form(xp, y, weights=None):
    """argmin over (W, b) of sum_t weights_t ||xp_t W^T + b - y_t||^2, by a plain least-squares solve."""
    a = torch.cat([xp.double(), torch.ones(xp.shape[0], 1, dtype=torch.float64)], 1)
    root = torch.ones(xp.shape[0], 1, dtype=torch.float64) if weights is None else weights.double().sqrt()[:, None]
    theta = torch.linalg.lstsq(a * root, y.double() * root).solution
    return theta[:-1].t(), theta[-1]


def test_residual_weighting_weighs_each_token_by_the_inverse_mean_square_of_the_stream(setup):
    model, _ = setup
    plan, gm = pruned(setup, "lstsq", weighting="residual")
    cols = torch.tensor(plan.kept["model.layers.0.mlp.down_proj.weight"][1])
    xd, y = dense_io(model, 0)
    stream = []  # the residual stream after layer 0's MLP output is added: layer 0's output
    handle = model.model.layers[0].register_forward_hook(
        lambda m, a, out: stream.append((out[0] if isinstance(out, tuple) else out).detach()))
    with torch.no_grad():
        model(CAL)
    handle.remove()
    weights = 1 / stream[0].reshape(-1, stream[0].shape[-1]).double().pow(2).mean(-1)
    w, b = closed_form(xd[:, cols], y, weights)
    down = gm.get_submodule("model.layers.0.mlp.down_proj")
    assert torch.allclose(down.weight.double(), w, atol=1e-4) and torch.allclose(down.bias.double(), b, atol=1e-4)
    unweighted, _ = closed_form(xd[:, cols], y)
    assert not torch.allclose(unweighted, w, atol=1e-3)  # the weights matter on this model


def test_auto_ridge_picks_the_candidate_best_on_held_out_rows_and_refits_it_on_all(setup):
    from fxprune.reconstruction.reconstruct_layers import RIDGES, Stats, fit, solve
    g = torch.Generator().manual_seed(3)
    n, d, out = 400, 24, 6
    # the 8 removed inputs are linear mixtures of the 16 kept ones (plus a little noise): a refit can recover them
    xd = torch.randn(n, 16, generator=g) @ torch.randn(16, d, generator=g) + 0.01 * torch.randn(n, d, generator=g)
    proj = Projection("w", torch.randn(out, d, generator=g), torch.randn(out, generator=g), None, torch.arange(16))
    xp, w0 = xd[:, :16], proj.dense_weight[:, :16]
    y = xd @ proj.dense_weight.t() + proj.dense_bias
    weights = torch.rand(n, generator=g) + 0.5
    held = torch.arange(n) % 4 == 3
    weight, bias, choice = fit(xp, y, w0, None, "lstsq", "auto", weights, held)
    train, test = Stats(xp[~held], y[~held], weights[~held]), Stats(xp[held], y[held], weights[held])
    scores = {"keep": test.error(w0.double(), torch.zeros(out, dtype=torch.float64)),
              "bias": test.error(*solve(train, w0.double(), "bias", 0.0))}
    scores.update({f"lstsq:{r:g}": test.error(*solve(train, w0.double(), "lstsq", r)) for r in RIDGES})
    assert choice == min(scores, key=scores.get) and choice.startswith("lstsq")
    kind, _, r = choice.partition(":")
    expected = solve(Stats(xp, y, weights), w0.double(), kind, float(r))
    # the same sums, added in another order in float32
    assert rel_err(weight, expected[0]) < 1e-4 and rel_err(bias, expected[1]) < 1e-4
    # the error is the weighted sum of squares it says it is (up to the float32 rounding of its sums)
    direct = float((weights[held, None] * (xp[held] @ weight.float().t() + bias.float() - y[held]).pow(2)).sum())
    assert abs(test.error(weight, bias) - direct) < 1e-4 * test.syy


def test_auto_ridge_keeps_a_projection_nothing_improves_on_held_out_rows():
    from fxprune.reconstruction.reconstruct_layers import fit
    g = torch.Generator().manual_seed(4)
    xd = torch.randn(64, 40, generator=g)
    proj = Projection("w", torch.randn(5, 40, generator=g), None, None, torch.arange(40))
    w0 = proj.dense_weight.clone()  # nothing was removed: the sliced weight is already exact
    weight, bias, choice = fit(xd, proj.output(xd), w0, None, "lstsq", "auto", None, torch.arange(64) % 4 == 3)
    assert choice == "keep" and torch.equal(weight, w0.double()) and not bias.any()


def test_first_refit_is_the_least_squares_optimum_and_lowers_the_error(setup):
    model, _ = setup
    plan, gm = pruned(setup, "lstsq")
    cols = torch.tensor(plan.kept["model.layers.0.mlp.down_proj.weight"][1])
    xd, y = dense_io(model, 0)
    xp = xd[:, cols]  # nothing before layer 0's down_proj changed: its kept inputs are the dense ones
    w, b = closed_form(xp, y)
    down = gm.get_submodule("model.layers.0.mlp.down_proj")
    assert torch.allclose(down.weight.double(), w, atol=1e-4) and torch.allclose(down.bias.double(), b, atol=1e-4)
    sliced = model.model.layers[0].mlp.down_proj.weight.detach()[:, cols]
    before = (xp @ sliced.t() - y).pow(2).sum()
    after = (xp @ down.weight.detach().t() + down.bias.detach() - y).pow(2).sum()
    assert after < before


def test_later_layers_are_fitted_on_the_pruned_models_own_activations(setup):
    model, _ = setup
    _, gm = pruned(setup, "lstsq", target="output")
    down = gm.get_submodule("model.layers.1.mlp.down_proj")
    xp = module_inputs(down, lambda: gm(CAL))  # the reconstructed model's input to layer 1's down_proj
    _, y = dense_io(model, 1)
    w, b = closed_form(xp, y)
    assert torch.allclose(down.weight.double(), w, atol=1e-4) and torch.allclose(down.bias.double(), b, atol=1e-4)


def stream_before_mlp_add(gm, layer):
    """The residual stream layer `layer`'s MLP output is added to: its post-attention norm's input, taken
    by running the graph with an Interpreter (the norm is inlined in the exported graph), as [tokens, hidden]."""
    from fxprune.reconstruction.projections import first_projections, residual_partner
    path = f"model.layers.{layer}.mlp.down_proj"
    lifted = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == path]  # the pruned graph's
    down = lifted[0] if lifted else next(n for n, name, *_ in first_projections(gm) if name == path + ".weight")
    partner, seen = residual_partner(down), {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n is partner:
                seen["stream"] = value
            return value
    with torch.no_grad():
        Recorder(gm).run(CAL, torch.ones_like(CAL), False)
    return seen["stream"].reshape(-1, seen["stream"].shape[-1])


def test_the_stream_target_also_takes_back_the_drift_earlier_layers_left_in_the_stream(setup):
    model, dg = setup
    _, gm = pruned(setup, "lstsq")  # target "stream", the default
    down = gm.get_submodule("model.layers.1.mlp.down_proj")
    xp = module_inputs(down, lambda: gm(CAL))
    _, y = dense_io(model, 1)
    drift = stream_before_mlp_add(gm, 1) - stream_before_mlp_add(dg.gm, 1)  # layer 0's pruned MLP moved it
    assert drift.norm() > 1e-3 * y.norm()
    w, b = closed_form(xp, y - drift)  # the stream after the add, R_p + out, as close as it gets to R_d + y
    assert torch.allclose(down.weight.double(), w, atol=1e-4) and torch.allclose(down.bias.double(), b, atol=1e-4)
    first = gm.get_submodule("model.layers.0.mlp.down_proj")  # no drift before it: both targets fit it alike
    other = pruned(setup, "lstsq", target="output")[1].get_submodule("model.layers.0.mlp.down_proj")
    assert torch.allclose(first.weight, other.weight, atol=1e-6)


MANY = torch.randint(1, 128, (160, 12), generator=torch.Generator().manual_seed(7))  # 1,920 calibration tokens
HELD_OUT = torch.randint(1, 128, (16, 12), generator=torch.Generator().manual_seed(9))  # not calibrated on


def held_out_error(setup, mode, **settings) -> float:
    """Norm of the pruned model's logits minus the dense model's on HELD_OUT, refitted on MANY."""
    model, _ = setup
    with torch.no_grad():
        return float((pruned(setup, mode, ridge=0.05, calibration=MANY, **settings)[1](HELD_OUT).logits
                      - model(HELD_OUT).logits).norm())


def test_the_stream_target_ends_closer_to_the_dense_model_than_the_output_target(setup):
    errors = {t: held_out_error(setup, "lstsq", targets=("heads", "mlp"), target=t) for t in ("output", "stream")}
    assert errors["stream"] < errors["output"]


def test_bias_mode_keeps_the_sliced_weights_and_matches_the_mean(setup):
    model, _ = setup
    plan, gm = pruned(setup, "bias")
    cols = torch.tensor(plan.kept["model.layers.0.mlp.down_proj.weight"][1])
    xd, y = dense_io(model, 0)
    down = gm.get_submodule("model.layers.0.mlp.down_proj")
    sliced = model.model.layers[0].mlp.down_proj.weight.detach()[:, cols]
    assert torch.equal(down.weight.detach(), sliced)
    expected = y.double().mean(0) - sliced.double() @ xd[:, cols].double().mean(0)
    assert torch.allclose(down.bias.double(), expected, atol=1e-5)


def test_a_strong_ridge_pulls_the_refit_back_to_the_sliced_weights(setup):
    model, _ = setup
    plan, gm = pruned(setup, "lstsq", ridge=1e6)
    cols = torch.tensor(plan.kept["model.layers.0.mlp.down_proj.weight"][1])
    sliced = model.model.layers[0].mlp.down_proj.weight.detach()[:, cols]
    assert rel_err(gm.get_submodule("model.layers.0.mlp.down_proj").weight, sliced) < 1e-4


def test_nothing_pruned_changes_nothing(setup):
    model, dg = setup
    gm = rewrite(dg, {})
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    result = ReconstructLayersPass(dg.gm, dg.aliases, {}, Calibration.of(CAL), Refit(mode="lstsq", ridge="auto"))(gm)
    assert not result.modified
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    ids, mask = inputs()
    with torch.no_grad():
        assert torch.equal(gm(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_heads_and_hidden_readers_are_refitted_too(setup):
    plan, gm = pruned(setup, "lstsq", ridge=0.05, targets=("heads", "mlp", "hidden"))
    biased = {n for n, m in gm.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    # every projection whose input dimension lost units; the tied lm_head stays tied and unrefitted
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj"} <= biased
    assert "lm_head" not in biased
    assert plan.params_after == sum(p.numel() for p in gm.parameters())


def test_reconstruction_lowers_the_output_error_on_held_out_text(setup):
    errors = {m: held_out_error(setup, m) for m in ("none", "bias", "lstsq")}
    assert errors["lstsq"] < errors["bias"] < errors["none"]


def test_biases_survive_peft_and_save_load(setup, tmp_path):
    from peft import LoraConfig, get_peft_model
    _, gm = pruned(setup, "lstsq", ridge=0.05)
    ids, mask = inputs()
    fxprune.save(gm, tmp_path / "p")
    loaded = fxprune.load(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, gm(ids, attention_mask=mask).logits)
    peft_model = get_peft_model(loaded, LoraConfig(r=2, target_modules=["down_proj"]))
    wrapped = peft_model.base_model.model.get_submodule("model.layers.0.mlp.down_proj")
    assert wrapped.base_layer.bias is not None


def test_zero_mask_still_holds_with_reconstruction_off(setup):
    model, dg = setup
    plan, gm = pruned(setup, "none", targets=("heads", "mlp"))
    ids, mask = inputs()
    with torch.no_grad():
        expected = zero_masked(model, dg, plan)(ids, attention_mask=mask).logits
        got = gm(ids, attention_mask=mask).logits
    assert rel_err(got[mask.bool()], expected[mask.bool()]) < 1e-5
    assert all(m.bias is None for m in gm.modules() if isinstance(m, torch.nn.Linear))


def test_a_plan_asking_for_reconstruction_needs_calibration(setup):
    model, dg = setup
    plan, _ = pruned(setup, "lstsq")
    with pytest.raises(fxprune.PlanError, match="calibration"):
        fxprune.apply(model, plan, dg=dg)


def test_kv_cache_generation_uses_the_refitted_weights_and_biases(setup):
    _, gm = pruned(setup, "lstsq", ridge=0.05, targets=("heads", "mlp"))
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    cached = fxprune.generate(gm, ids, max_new_tokens=6)
    recomputed = ids
    with torch.no_grad():
        for _ in range(6):
            recomputed = torch.cat([recomputed, gm(recomputed).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(cached, recomputed)


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        return torch.special.entr(self.b(torch.relu(self.a(x))))


def test_stepping_stops_after_the_last_projection_it_was_asked_for():
    """The refit never runs what follows its last projection (a large vocabulary's logits, say)."""
    from fxprune.reconstruction.projections import step

    gm = torch.fx.symbolic_trace(TwoLinears())
    ran = []
    orig = torch.fx.Interpreter.run_node
    torch.fx.Interpreter.run_node = lambda self, n: ran.append(n.name) or orig(self, n)
    try:
        stops = {n: n.name for n in gm.graph.nodes if n.op == "call_module"}
        x = torch.randn(3, 4)
        seen = [(name, value.shape) for name, value, _ in step(gm, {"x": x}, stops)]
    finally:
        torch.fx.Interpreter.run_node = orig
    assert seen == [("a", (3, 4)), ("b", (3, 4))]
    assert ran == ["a", "relu"]  # neither b nor what follows it ran


def test_bfloat16_forward_passes_refit_about_as_float32_does_with_the_fits_in_full_precision(setup):
    """precision="bfloat16": the graphs' matmuls under autocast, the sums and solves not (their weights and biases
    stay float32 and land within bfloat16's rounding of the float32 refit, yet not on it)."""
    ratio = 0.3
    _, exact = pruned(setup, "lstsq", ridge=0.1, ratio=ratio)
    plan, fast = pruned(setup, "lstsq", ridge=0.1, ratio=ratio, precision="bfloat16")
    assert plan.config.reconstruct.precision == "bfloat16"
    for name, p in fast.named_parameters():
        if name.endswith(("down_proj.weight", "down_proj.bias")):
            q = exact.get_parameter(name)
            assert p.dtype == torch.float32
            assert 0 < rel_err(p, q) < 0.05, (name, rel_err(p, q))


def test_autocast_covers_only_the_forward_steps():
    """The items come from autocast-ed matmuls; the caller's work between two items runs without autocast."""
    from fxprune.reconstruction.reconstruct_layers import autocast_steps
    from fxprune.reconstruction.projections import step

    gm = torch.fx.symbolic_trace(TwoLinears())
    stops = {n: n.name for n in gm.graph.nodes if n.target == "b"}  # b reads relu(a(x))
    seen = []
    for _, x, _ in autocast_steps(step(gm, {"x": torch.randn(3, 4)}, stops), "cpu", torch.bfloat16):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
    assert seen == [(torch.bfloat16, False)]
    (_, x, _), = list(autocast_steps(step(gm, {"x": torch.randn(3, 4)}, stops), "cpu", None))
    assert x.dtype == torch.float32
