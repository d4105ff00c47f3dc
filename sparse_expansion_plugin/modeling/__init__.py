"""Architecture knowledge shared by every feature: which modules are a model's FFN linears."""
