"""fedleak: measure how much private data a curious federated-learning server can reconstruct.

As a library (`docs/api.md`):

- `observe(model, update, input_shape=..., num_examples=...)`: an `Observation`, what a curious
  server sees of one client's update, from your own model and gradient (or weight delta);
- `build_attack(name, params)`: a registered attack (`attack_names()`), configured by its
  settings (`fedleak config-keys` lists them);
- `reconstruct(attack, observation, aux_inputs, aux_labels, max_iterations=...)`: run it;
- `score(reconstruction, inputs, labels)`: match the guesses to the private batch and measure
  them (MSE, PSNR, SSIM, LPIPS, label accuracy; token accuracy and ROUGE for a language
  model's token sequences);
- `audit(grid, strategy, settings, ...)`: inside your own Flower ServerApp, in place of
  `strategy.start(...)`: your strategy wrapped in fedleak's `CuriousStrategy` (your ClientApp
  adds `fedleak.client.audit.fedleak_mod` and declares its batch; README "Audit your Flower
  app");
- `register_attack`, `register_defense`, `register_model`, `register_dataset`: add your own
  (or declare entry points in groups `fedleak.attacks`, `fedleak.defenses`, `fedleak.models`,
  `fedleak.datasets` so that every process of a run finds them).

Names are imported on first use, so `import fedleak` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "observe": "fedleak.api",
    "batchnorm_statistics": "fedleak.api",
    "reconstruct": "fedleak.api",
    "score": "fedleak.api",
    "knowledge": "fedleak.api",
    "torch_threads": "fedleak.api",
    "Leakage": "fedleak.api",
    "TextLeakage": "fedleak.api",
    "audit": "fedleak.simulations.study",
    "build_attack": "fedleak.attacks.registry",
    "attack_names": "fedleak.attacks.registry",
    "register_attack": "fedleak.attacks.registry",
    "register_defense": "fedleak.defenses.registry",
    "parse_defense_spec": "fedleak.defenses.spec",
    "register_model": "fedleak.models.registry",
    "build_model": "fedleak.models.build",
    "ModelSpec": "fedleak.models.spec",
    "register_dataset": "fedleak.data.registry",
    "load_dataset": "fedleak.data.registry",
    "Observation": "fedleak.attacks.types",
    "AttackerKnowledge": "fedleak.attacks.types",
    "Budget": "fedleak.attacks.types",
    "Reconstruction": "fedleak.attacks.types",
    "Settings": "fedleak.settings",
    "setting": "fedleak.settings",
    "ConfigError": "fedleak.settings",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedleak' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
