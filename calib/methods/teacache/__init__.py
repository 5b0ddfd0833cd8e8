"""TeaCache: the rescaler estimators (rescalers), their fit on traces (fit), threshold tuning (tune)."""
