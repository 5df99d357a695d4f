"""The accuracy guard's state machine is total (issue 17): generated sequences of validations, training steps,
scheduled updates, checkpoint round trips, ends of training and new fits, each compared after every step with an
independent model of what must hold: the decision, the target, the held count, and the weights themselves (dense
copies taken at each raise, against the guard's own sparse or dense snapshot).

Deterministic and fast: derandomized, no example database, a bounded number of short sequences.
"""

import io
import math

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lightning_compress.pruning import masks as mask_engine
from lightning_compress.pruning import scores
from lightning_compress.pruning.guard import HOLD, RAISE, ROLL_BACK, AccuracyGuard, GuardedSchedule

NAMES = ["a", "b"]
SCHEDULES = [[0.0, 0.3, 0.6], [0.5], [0.0, 0.0, 0.5, 0.9], [0.2, 0.2, 0.4], [0.6, 0.3, 0.7]]
VALUES = [1.0, 0.97, 0.9, 0.5, math.nan]


class Expected:
    """What the rules in guard.py's docstring say must happen, kept apart from the implementation: plain Python
    numbers and dense copies of the weights."""

    def __init__(self, max_drop, patience, baseline, targets):
        self.max_drop, self.patience, self.targets = max_drop, patience, targets
        self.given_baseline = baseline
        self.new_fit()

    def new_fit(self):
        self.baseline = self.given_baseline
        self.latest, self.seen, self.counted = None, 0, 0
        self.started, self.streak, self.held, self.rolled_back = False, 0, 0, False
        self.position, self.target, self.saved = 0, 0.0, None  # saved: (weights, masks, target) at the last raise

    def validate(self, value):
        value = -math.inf if math.isnan(value) else value
        self.latest, self.seen = value, self.seen + 1
        if not self.started and self.given_baseline is None:
            self.baseline = value if self.baseline is None else max(self.baseline, value)

    def decide(self, raising):
        """The decision at an update (``raising``: its target is above the current one) or at the end (False)."""
        if self.rolled_back:
            return None
        if not self.started and not raising:
            return RAISE
        if self.baseline is None:
            self.held += raising
            return HOLD if raising else RAISE
        self.started = True
        if self.latest is None or self.latest >= self.baseline - self.max_drop:
            self.streak = 0
            return RAISE
        if self.counted != self.seen:
            self.counted, self.streak = self.seen, self.streak + 1
        self.held += raising
        if self.streak >= self.patience:
            self.rolled_back = True
            return ROLL_BACK
        return HOLD


@settings(
    max_examples=50,
    stateful_step_count=30,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
class GuardMachine(RuleBasedStateMachine):
    @initialize(
        max_drop=st.sampled_from([0.0, 0.05]),
        patience=st.integers(1, 3),
        baseline=st.sampled_from([None, 1.0]),
        schedule=st.sampled_from(SCHEDULES),
    )
    def start(self, max_drop, patience, baseline, schedule):
        generator = torch.Generator().manual_seed(0)
        self.weights = [torch.randn(6, 5, generator=generator), torch.randn(7, generator=generator)]
        self.masks = [mask_engine.new_mask(w) for w in self.weights]
        self.settings = (max_drop, "max", patience, baseline)
        self.schedule = GuardedSchedule(AccuracyGuard(*self.settings), schedule)
        self.expected = Expected(max_drop, patience, baseline, list(schedule))
        self.steps = self.updates = 0
        self.ended = False

    def grow(self, target):
        source = scores.l1_scores(self.weights)
        mask_engine.update_unstructured(self.weights, self.masks, target, source, "global")
        mask_engine.apply_masks(self.weights, self.masks)

    @rule(value=st.sampled_from(VALUES))
    @precondition(lambda self: not self.ended)
    def validate(self, value):
        self.schedule.guard.observe(value)
        self.expected.validate(value)

    @rule()
    @precondition(lambda self: not self.ended)
    def optimizer_step(self):
        """Training moves every weight; the masks keep the pruned ones at exactly 0."""
        self.steps += 1
        noise = torch.Generator().manual_seed(self.steps)
        for w in self.weights:
            w.add_(torch.randn(w.shape, generator=noise))
        mask_engine.apply_masks(self.weights, self.masks)

    @rule()
    @precondition(lambda self: not self.ended)
    def scheduled_update(self):
        e = self.expected
        done = e.position >= len(e.targets)
        target = e.target if done else e.targets[e.position]
        before = [w.clone() for w in self.weights]
        self.updates += 1
        decision = e.decide(target > e.target)
        expected = None if decision is None or (done and decision in (RAISE, HOLD)) else decision
        if expected == RAISE:
            if target > e.target:
                e.saved = ([w.clone() for w in self.weights], [m.clone() for m in self.masks], e.target)
            e.position, e.target = e.position + 1, max(e.target, target)
        actual = self.schedule.update(self.weights, self.masks, self.grow)
        assert actual == expected
        if expected == ROLL_BACK:
            self._check_rolled_back(before)
        elif expected != RAISE:
            assert all(torch.equal(a, b) for a, b in zip(self.weights, before))  # a hold changes nothing

    @rule(value=st.sampled_from(VALUES))
    @precondition(lambda self: not self.ended)
    def epoch(self, value):
        """The usual order within a fit: train, validate, then the next epoch's scheduled update."""
        self.optimizer_step()
        self.validate(value)
        self.scheduled_update()

    @rule()
    @precondition(lambda self: not self.ended and self.updates >= 3)
    def end_of_training(self):
        before = [w.clone() for w in self.weights]
        rolled_back = self.expected.decide(False) == ROLL_BACK
        assert self.schedule.end(self.weights, self.masks) == rolled_back
        if rolled_back:
            self._check_rolled_back(before)
        self.ended = True

    @rule()
    def checkpoint_round_trip(self):
        """Save mid-way and resume into fresh objects, through torch.save as Lightning writes checkpoints."""
        buffer = io.BytesIO()
        torch.save({"schedule": self.schedule.state_dict(NAMES), "masks": [m != 0 for m in self.masks]}, buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        self.schedule = GuardedSchedule(AccuracyGuard(*self.settings), self.schedule.targets)
        self.schedule.load_state_dict(state["schedule"], NAMES)
        self.masks = [mask_engine.mask_from_bool(keep, w) for keep, w in zip(state["masks"], self.weights)]

    @rule()
    @precondition(lambda self: self.ended)
    def new_fit(self):
        """A later fit with the same callback: a fresh guard and schedule; the masks stay (make_permanent=False)."""
        self.schedule = GuardedSchedule(AccuracyGuard(*self.settings), self.schedule.targets)
        self.expected.new_fit()
        self.ended, self.updates = False, 0

    def _check_rolled_back(self, before):
        saved = self.expected.saved
        if saved is None:  # nothing raised in this fit: the weights stay as they were
            assert all(torch.equal(a, b) for a, b in zip(self.weights, before))
            return
        weights, masks, target = saved
        self.expected.target = target
        assert all(torch.equal(a, b) for a, b in zip(self.weights, weights))
        assert all(torch.equal(a != 0, b != 0) for a, b in zip(self.masks, masks))

    @invariant()
    def agrees_with_the_model(self):
        if not hasattr(self, "expected"):
            return
        e, guard = self.expected, self.schedule.guard
        assert self.schedule.target == e.target and self.schedule.position == e.position
        assert (guard.held, guard.streak, guard.rolled_back) == (e.held, e.streak, e.rolled_back)
        assert guard.pruning_started == e.started
        assert guard.baseline == e.baseline
        n = sum(w.numel() for w in self.weights)
        pruned = sum(int((m == 0).sum()) for m in self.masks)
        assert pruned >= mask_engine.count_to_prune(e.target, n)  # at least the target, more only if a fit before
        for w, m in zip(self.weights, self.masks):
            assert not w[m == 0].any()  # pruned weights are exactly 0, whatever happened


TestGuardStates = GuardMachine.TestCase
