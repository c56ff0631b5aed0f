"""The factory floor: requests, scheduler, KV page manager, the engine loop and its async wrapper."""
