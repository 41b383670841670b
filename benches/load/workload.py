"""Who the load-test users are and how many there are over time, shared by the Locust
users (locustfile.py) and the driver (load_test.py, which prices these products, makes
keys for the biggest tenants and reports per stage). Kept apart from locustfile.py,
which imports Locust."""

# 1,000 tenants; locustfile.py draws them by a Zipf law, so t0000 sends the most.
TENANTS = [f"t{i:04d}" for i in range(1000)]
# (product_sku, use_unit) pairs the pulses are for.
PRODUCTS = [("api.requests", "request"), ("storage.standard", "GB"), ("compute.vcpu", "vCPU-s"), ("egress", "GB")]

SCENARIOS = ("sustained", "stress", "spike", "soak", "ci")


def stages(scenario, users, duration):
    """(end second, users, spawn rate per second) steps of a scenario."""
    if scenario in ("sustained", "soak"):
        return [(duration, users, users)]
    if scenario == "stress":
        # 100 -> 500 -> 1,000 -> 2,000 -> 3,000 over 5 minutes, then back to 100 for 2.
        steps, t = [], 0
        for n in (100, 500, 1000, 2000, 3000):
            t += 60
            steps.append((t, n, max(n / 10, 50)))
        return steps + [(t + 120, 100, 1000)]
    if scenario == "spike":
        return [(60, 100, 100), (120, 2000, 2000), (240, 100, 2000)]
    if scenario == "ci":
        # 60 s at the target rate, then a spike to 10x the users for 20 s, then 40 s back.
        return [(60, users, users), (80, users * 10, users * 10), (120, users, users * 10)]
    raise ValueError(f"unknown scenario {scenario!r}")
