"""HybridController: the hybrid optimizer's decisions on plain numbers — no tensor anywhere in these tests."""
import math

import pytest

from hybrid_optimization.controller import HybridController

SETTINGS = dict(trust_region="absolute", radius_adaptation=True, radius_range=(0.001, 1.0), meta_learning=True,
                n_clusters=None, rho_from="gradients", projected_hypergradient=True, aux_radius="scaled",
                warmup_steps=0, decay_steps=None, anneal_meta_learning=True, trust_radius=0.01)


def settings(**overrides):
    return {**SETTINGS, **overrides}


def take_step(ctl, s, *, grad_norm=1.0, dot_full=0.0, dot_free=0.0, loss=1.0, multiplier=1.0, radius=None,
              update_sq=(1.0,), grad_dot_update=(-1.0,), prediction=None):
    obs = ctl.observe(s, loss=loss, grad_norm=grad_norm, dot_full=dot_full, dot_free=dot_free, cluster_id=None,
                      has_aux=prediction is not None)
    m, mu = ctl.decide(s, prediction)
    proj = ctl.project(s, multiplier if prediction is None else m, mu if radius is None else radius,
                       list(update_sq), list(grad_dot_update))
    ctl.record(obs, proj, loss)
    return obs, (m, mu), proj


def test_schedule_warms_up_then_decays_by_cosine_and_is_off_by_default():
    s = settings(warmup_steps=4, decay_steps=20)
    assert [HybridController.schedule_factor(s, k) for k in (0, 1, 3)] == [0.25, 0.5, 1.0]
    assert HybridController.schedule_factor(s, 12) == pytest.approx(0.5)
    assert HybridController.schedule_factor(s, 20) == 0.0 and HybridController.schedule_factor(s, 99) == 0.0
    assert HybridController.schedule_factor(settings(), 10 ** 6) == 1.0


def test_absolute_projection_scales_every_tensor_alike_and_reports_the_cut():
    proj = HybridController.project(settings(), 2.0, 1.0, [9.0, 16.0], [-3.0, -4.0])   # ‖m·u‖ = 2·5 = 10
    assert proj.active and proj.scales == pytest.approx([0.2, 0.2]) and proj.free == [False, False]
    assert proj.proposed_norm == pytest.approx(10.0) and proj.applied_norm == 1.0
    assert proj.predicted == pytest.approx(0.2 * 7.0) and proj.free_norm == 0.0
    loose = HybridController.project(settings(), 2.0, 100.0, [9.0, 16.0], [-3.0, -4.0])
    assert not loose.active and loose.scales == [2.0, 2.0] and loose.applied_norm == pytest.approx(10.0)
    assert loose.free_norm == pytest.approx(10.0)


def test_relative_projection_caps_only_the_tensor_that_outgrows_its_weight():
    s = settings(trust_region="relative")
    # tensor 0: ‖u‖ = 1, ‖W‖ = 100 → limit 1 at μ = 0.01: free; tensor 1: ‖u‖ = 1, ‖W‖ = 10 → limit 0.1: cut to 0.1
    proj = HybridController.project(s, 1.0, 0.01, [1.0, 1.0], [0.0, 0.0], param_sq=[1e4, 100.0], numels=[4, 4])
    assert proj.active and proj.free == [True, False] and proj.scales == pytest.approx([1.0, 0.1])
    zero = HybridController.project(s, 1.0, 0.01, [1.0], [0.0], param_sq=[0.0], numels=[10 ** 6])
    assert zero.scales == pytest.approx([0.01 * 1e-3 * 1e3])        # a zero tensor may still move μ·1e-3·√n


def test_bounded_projection_is_relative_with_a_cap_on_each_tensors_update_rms():
    s = settings(trust_region="bounded", max_update_rms=1e-3)
    # n = 100: the cap is ‖ΔW‖ ≤ 1e-3·10 = 0.01. Tensor 0: relative limit 0.01·100 = 1 → the cap (0.01) cuts ‖u‖ = 1
    # to 0.01; tensor 1: relative limit 0.01·0.5 = 0.005 < cap → the relative limit cuts it; tensor 2: free.
    proj = HybridController.project(s, 1.0, 0.01, [1.0, 1.0, 1e-6], [0.0, 0.0, 0.0],
                                    param_sq=[1e4, 0.25, 1.0], numels=[100, 100, 100])
    assert proj.active and proj.free == [False, False, True]
    assert proj.scales == pytest.approx([0.01, 0.005, 1.0])
    # the same call in relative mode lets tensor 0 take its whole update: the cap is all that differs
    rel = HybridController.project(settings(trust_region="relative"), 1.0, 0.01, [1.0, 1.0, 1e-6], [0.0] * 3,
                                   param_sq=[1e4, 0.25, 1.0], numels=[100, 100, 100])
    assert rel.scales == pytest.approx([1.0, 0.005, 1.0])
    # a radius grown to the top of its range does not lift the cap
    wide = HybridController.project(s, 10.0, 1.0, [1.0], [0.0], param_sq=[1e4], numels=[100])
    assert wide.applied_norm == pytest.approx(0.01)


def test_rms_projection_caps_the_whole_models_update_rms_at_mu_times_max_update_rms():
    s = settings(trust_region="rms", max_update_rms=1e-3)
    # two tensors of 50 entries, every entry proposing 0.01 (update RMS 1e-2): N = 100, ‖m·u‖ = 0.01·√100 = 0.1
    proj = HybridController.project(s, 1.0, 0.5, [50 * 1e-4] * 2, [-1.0, -1.0], numels=[50, 50])
    assert proj.active and proj.free == [False, False] and proj.scales == pytest.approx([0.05, 0.05])
    assert proj.applied_norm == pytest.approx(0.5 * 1e-3 * math.sqrt(100))      # the radius, reported as applied
    assert proj.applied_norm / math.sqrt(100) == pytest.approx(0.5e-3)          # update RMS = μ·max_update_rms
    assert proj.predicted == pytest.approx(0.1) and proj.proposed_norm == pytest.approx(0.1)
    # below the cap nothing is cut; per-tensor multipliers (cluster factors) are scaled together, like absolute's
    loose = HybridController.project(s, 1.0, 0.5, [50 * 1e-8] * 2, [0.0, 0.0], numels=[50, 50])
    assert not loose.active and loose.scales == [1.0, 1.0] and loose.applied_norm == pytest.approx(1e-3)
    mixed = HybridController.project(s, [1.0, 3.0], 0.5, [50 * 1e-4] * 2, [0.0, 0.0], numels=[50, 50])
    assert mixed.active and mixed.scales[1] == pytest.approx(3 * mixed.scales[0])
    assert mixed.applied_norm == pytest.approx(0.5e-3 * 10)


def test_rms_gives_a_model_twice_as_large_the_same_per_entry_step_where_absolute_shrinks_it():
    """The same per-entry proposal (0.01 on every entry) on a model and on one with every tensor duplicated: rms
    takes the same per-entry step in both; absolute, its radius matched to the small model, cuts the large one's
    per-entry step by 1/√2 (a whole-model radius spread over twice the entries)."""
    small = dict(update_sq=[50 * 1e-4] * 2, grad_dot_update=[0.0] * 2, numels=[50, 50])
    large = dict(update_sq=[50 * 1e-4] * 4, grad_dot_update=[0.0] * 4, numels=[50] * 4)

    def per_entry(mode, radius, model):
        proj = HybridController.project(settings(trust_region=mode, max_update_rms=1e-3), 1.0, radius,
                                        model["update_sq"], model["grad_dot_update"], numels=model["numels"])
        return proj.applied_norm / math.sqrt(sum(model["numels"]))              # the applied update's RMS

    assert per_entry("rms", 0.5, small) == pytest.approx(0.5e-3) == per_entry("rms", 0.5, large)
    radius = 0.5e-3 * math.sqrt(100)            # absolute radius that gives the small model the same step
    assert per_entry("absolute", radius, small) == pytest.approx(0.5e-3)
    assert per_entry("absolute", radius, large) == pytest.approx(0.5e-3 / math.sqrt(2))


def test_rho_from_gradients_is_exact_on_a_quadratic_and_the_rule_grows_a_binding_radius():
    # f(x) = ½x², x = 1, step Δ = -0.5 (half way): g_{t-1}·Δ = -0.5, g_t·Δ = (0.5)(-0.5) = -0.25
    # actual = −½(g_{t-1} + g_t)·Δ = 0.375, predicted = 0.5 → ρ = 0.75
    ctl, s = HybridController(0.01), settings()
    take_step(ctl, s, grad_dot_update=(-0.5,), update_sq=(0.25,), radius=1.0)
    obs, _, _ = take_step(ctl, s, dot_full=-0.25)
    assert obs.rho == pytest.approx(0.75)
    ctl, s = HybridController(0.01), settings()
    take_step(ctl, s, update_sq=(4.0,), grad_dot_update=(-2.0,))                # binds: ‖u‖ = 2 > 0.01
    radius_before = ctl.radius
    obs, _, _ = take_step(ctl, s, dot_full=-0.01)         # g unchanged along the applied Δ = 0.005·u: ρ = 1
    assert obs.rho == pytest.approx(1.0) and ctl.radius == pytest.approx(2 * radius_before)
    ctl2 = HybridController(0.01)
    take_step(ctl2, s, update_sq=(4.0,), grad_dot_update=(-2.0,))
    take_step(ctl2, s, dot_full=+0.04)                    # overshoot: ρ < ¼ → halve
    assert ctl2.radius == pytest.approx(0.005)


def test_rho_from_losses_uses_the_loss_difference():
    ctl, s = HybridController(0.5), settings(rho_from="losses")
    take_step(ctl, s, loss=2.0, grad_dot_update=(-1.0,), update_sq=(0.01,))
    obs, _, _ = take_step(ctl, s, loss=1.5)
    assert obs.rho == pytest.approx(0.5)


def test_hypergradient_is_the_cosine_with_the_free_part_of_the_previous_update():
    ctl, s = HybridController(1.0), settings(trust_region=None)
    take_step(ctl, s, update_sq=(4.0,), grad_dot_update=(-1.0,), multiplier=1.5)   # free ‖Δ‖ = 1.5·2 = 3
    obs, _, _ = take_step(ctl, s, grad_norm=2.0, dot_free=-3.0)
    assert obs.hypergradient == pytest.approx(-0.5)
    ctl.skip(s)                                                                       # no feedback after a skip
    obs, _, _ = take_step(ctl, s, grad_norm=2.0, dot_free=-3.0)
    assert math.isnan(obs.hypergradient)


def test_feedback_goes_to_the_aux_net_only_with_one_and_about_the_previous_state():
    ctl, s = HybridController(0.01), settings()
    first, _, _ = take_step(ctl, s, prediction=(1.0, 0.01), radius=100.0)
    assert first.feedback is None                         # nothing to learn from yet
    second, _, _ = take_step(ctl, s, prediction=(1.0, 0.01), dot_free=0.5, radius=100.0)
    assert second.feedback.features == first.state.feature_values() and second.feedback.hypergradient is not None
    assert take_step(ctl, settings(meta_learning=False), prediction=(1.0, 0.01))[0].feedback is None
    third, _, _ = take_step(ctl, s)                       # no aux net: no feedback
    assert third.feedback is None
    annealed, _, _ = take_step(ctl, settings(decay_steps=100), prediction=(1.0, 0.01))
    assert 0 < annealed.feedback.meta_lr_scale < 1


def test_decide_uses_the_prediction_the_rule_factor_and_the_backoff():
    ctl, s = HybridController(0.01), settings()
    assert ctl.decide(s, None) == (1.0, 0.01)
    ctl.radius_scale = 4.0
    assert ctl.decide(s, (2.0, 0.02)) == (2.0, pytest.approx(0.08))
    assert ctl.decide(settings(aux_radius="direct"), (2.0, 0.02)) == (2.0, 0.02)
    assert ctl.decide(settings(radius_adaptation=False), (2.0, 0.02)) == (2.0, 0.01)
    assert ctl.skip(s) == pytest.approx(0.005) and ctl.skipped_steps == 1
    assert ctl.decide(s, None) == (1.0, pytest.approx(0.005))            # backoff halves μ ...
    take_step(ctl, s)
    assert ctl.backoff == pytest.approx(0.625)                              # ... and recovers ×1.25 per step


def test_state_dict_round_trip_is_plain_numbers():
    ctl, s = HybridController(0.01), settings()
    for _ in range(3):
        take_step(ctl, s, dot_full=-0.5, update_sq=(4.0,), grad_dot_update=(-2.0,))
    state = ctl.state_dict()

    def plain(x):
        return x is None or isinstance(x, (int, float, bool, str)) or (
            isinstance(x, (list, tuple)) and all(plain(v) for v in x)) or (
            isinstance(x, dict) and all(plain(v) for v in x.values()))

    assert plain(state)
    other = HybridController(0.5)
    other.load_state_dict(state)
    assert other.state_dict() == state
    a = take_step(ctl, s, dot_full=-1.0)
    b = take_step(other, s, dot_full=-1.0)
    assert a[0].rho == b[0].rho and a[1] == b[1] and a[2] == b[2]


def test_cluster_scale_is_hypergradient_descent_in_log_space_within_the_range():
    assert HybridController.cluster_scale(1.0, -1.0, 0.1) == pytest.approx(math.exp(0.1))   # undershoot: up
    assert HybridController.cluster_scale(1.0, 0.5, 0.1) == pytest.approx(math.exp(-0.05))  # overshoot: down
    assert HybridController.cluster_scale(2.0, float("nan"), 0.1) == 2.0                   # no signal
    assert HybridController.cluster_scale(9.9, -1.0, 1.0) == pytest.approx(10.0)           # clamped
