"""Federated learning with user-level DP (DP-FedAvg with adaptive clipping), owned by the core: numpy only."""
