"""Cache methods: one folder per method (its CacheMethod, options, fit, tune, document section), behind one registry
list (:mod:`calib.methods.registry`); what they share: :mod:`.base` (the interface), :mod:`.search`, :mod:`.cost_model`,
:mod:`.trace_series`."""
