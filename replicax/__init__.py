"""replicax: the next-token distribution as a flow on the probability simplex."""

import importlib.metadata

from . import datasets as datasets
from ._analysis import (
    basins as basins,
    Basins as Basins,
    curl as curl,
    Cycles as Cycles,
    detect_cycle as detect_cycle,
    rps_product as rps_product,
)
from ._conserved import (
    frequency_penalty_hamiltonian as frequency_penalty_hamiltonian,
)
from ._discrete import (
    discrete_map as discrete_map,
    entropic_mirror_map as entropic_mirror_map,
    multiplicative_weights as multiplicative_weights,
)
from ._equilibrium import (
    Equilibrium as Equilibrium,
    equilibrium as equilibrium,
)
from ._flip import FlipMargin as FlipMargin, flip_margin as flip_margin
from ._fit import Fit as Fit, fit as fit
from ._generate import Generation as Generation, generate as generate
from ._flows import (
    AbstractFlow as AbstractFlow,
    EntropicReplicator as EntropicReplicator,
    Replicator as Replicator,
)
from ._lyapunov import (
    Lyapunov as Lyapunov,
    lyapunov_exponents as lyapunov_exponents,
)
from ._methods import (
    AbstractMethod as AbstractMethod,
    Exact as Exact,
    ODE as ODE,
    RestPoint as RestPoint,
    Switched as Switched,
    Switches as Switches,
)
from ._observables import (
    arc_length as arc_length,
    argmax as argmax,
    discarded_mass as discarded_mass,
    entropy as entropy,
    face as face,
    fisher_rao_distance as fisher_rao_distance,
    free_energy as free_energy,
    kl as kl,
    limit_log_p as limit_log_p,
    nucleus_size as nucleus_size,
    projection_cost as projection_cost,
    speed as speed,
    target_log_p as target_log_p,
    time_to as time_to,
    top_k_mass as top_k_mass,
)
from ._saveat import SaveAt as SaveAt
from ._statistics import (
    path_statistics as path_statistics,
    PathStatistics as PathStatistics,
)
from ._claims import ClaimCheck as ClaimCheck, check_claims as check_claims
from ._scores import (
    AbstractMemoryScore as AbstractMemoryScore,
    AbstractScore as AbstractScore,
    FrequencyPenalty as FrequencyPenalty,
    Logits as Logits,
    LowRankPayoff as LowRankPayoff,
    Payoff as Payoff,
    PresencePenalty as PresencePenalty,
    RepetitionPenalty as RepetitionPenalty,
    ScoreSum as ScoreSum,
    SelfReinforcement as SelfReinforcement,
)
from ._solution import RESULTS as RESULTS, Trajectory as Trajectory
from ._support import (
    AbstractSupport as AbstractSupport,
    AbstractThresholdSupport as AbstractThresholdSupport,
    Epsilon as Epsilon,
    Eta as Eta,
    Full as Full,
    Mask as Mask,
    MinP as MinP,
    TopK as TopK,
    TopP as TopP,
    Typical as Typical,
)
from ._solve import solve as solve


try:
    __version__ = importlib.metadata.version("replicax")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"
