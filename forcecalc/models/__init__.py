"""The models: SpinConv and ForceNet, with OCP's parameter names."""
