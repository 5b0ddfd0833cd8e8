"""Cache methods: one module (or package) per method, each a fit + tune + document section, behind one registry."""
