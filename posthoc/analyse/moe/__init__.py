"""MoE-fication: every FFN split into experts plus a router (Zhang et al. 2022)."""
