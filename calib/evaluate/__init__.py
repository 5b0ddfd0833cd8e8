"""Evaluation: image and latent metrics (:mod:`.metrics`), the one generation harness that ``calib eval``,
``calib demo`` and the frontier share (:mod:`.harness`), and the measured cost model (:mod:`.cost`)."""
