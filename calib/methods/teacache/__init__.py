"""TeaCache: the rescaler estimators (rescalers), their fit on traces (fit), the forecast choice (forecast), the
document (document), threshold tuning by replay (tune), the runtime objects (configs) and the registry entry (method)."""
