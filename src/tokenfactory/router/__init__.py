"""Routing requests across engine replicas (station 3 of the request trace).

``policy`` and ``index`` are plain Python (no Ray); ``simulate`` drives a fleet of simulated
engines; ``replica`` and ``engine`` run real replicas as Ray actors and import Ray only when
replicas are actually used, so ``import tokenfactory`` stays light.
"""
