// Scale-out networks from switches of one radix k (ISCA 2025 Table 3): two- and three-layer fat
// trees, the multi-plane fat tree (one two-layer fat tree per NIC plane), Slim Fly and Dragonfly.
// Links are switch-to-switch links; endpoints attach to their switch separately.
#include <stdio.h>
#include <string.h>

#include "plan/plan.h"

// The paper does not state its prices. These are the unique solution of its Table 3 totals
// (FT2 9 M$, FT3 491 M$, Slim Fly 146 M$, Dragonfly 1,522 M$), rounded to whole dollars; see
// docs/plan.md. They are a fit, not vendor quotes.
PlanPrices plan_prices_default(void) { return (PlanPrices){52934, 1443, 470, 1360}; }

static void price(PlanTopo *t, const PlanPrices *p) {
    t->cost_usd = (double)t->switches * p->switch_usd + (double)(t->links - t->local_links) * p->link_usd +
                  (double)t->local_links * p->local_link_usd + (double)t->endpoints * p->endpoint_usd;
    t->cost_per_endpoint_usd = t->cost_usd / (double)t->endpoints;
}

int plan_network(int64_t k, int64_t planes, int64_t df_groups, const PlanPrices *p, PlanTopo out[PLAN_NTOPO],
                 Error *err) {
    if (k < 4 || k > 4096 || k % 2)
        return err_set(err, "network: radix %lld: an even number of ports in [4, 4096] is needed", (long long)k);
    if (planes < 1 || planes > 1024)
        return err_set(err, "network: planes %lld: between 1 and 1024 planes are supported", (long long)planes);
    memset(out, 0, sizeof(PlanTopo) * PLAN_NTOPO);

    // FT2: k leaves (k/2 ports down, k/2 up) under k/2 spines
    out[0] = (PlanTopo){"FT2", "two-layer fat tree", k * k / 2, 3 * k / 2, k * k / 2, 0, 0, 0};
    out[1] = (PlanTopo){"MPFT", "multi-plane fat tree", planes * out[0].endpoints, planes * out[0].switches,
                        planes * out[0].links, 0, 0, 0};
    // FT3: k pods of k/2 edge and k/2 aggregation switches, (k/2)^2 core switches
    out[2] = (PlanTopo){"FT3", "three-layer fat tree", k * k * k / 4, 5 * k * k / 4, k * k * k / 2, 0, 0, 0};

    // Slim Fly (MMS graph): q = 4w + delta with delta in {-1, 0, 1}; 2q^2 switches of network
    // degree k' = (3q - delta)/2, each with ceil(k'/2) endpoints; the largest q that fits k ports.
    // (A true MMS graph also needs q to be a prime power; the paper's q = 28 is not, so the
    // formulas are used as a size model.)
    int64_t q_best = 0, kn_best = 0, p_best = 0;
    for (int64_t q = 2; q <= k; q++) {
        int64_t r = q % 4;
        if (r == 2) continue;
        int64_t delta = r == 1 ? 1 : r == 3 ? -1 : 0;
        int64_t kn = (3 * q - delta) / 2, pe = (kn + 1) / 2;
        if (kn + pe <= k) q_best = q, kn_best = kn, p_best = pe;
    }
    if (!q_best) return err_set(err, "network: radix %lld is too small for a Slim Fly", (long long)k);
    int64_t sf_switches = 2 * q_best * q_best;
    out[3] = (PlanTopo){"SF", "Slim Fly", sf_switches * p_best, sf_switches, sf_switches * kn_best / 2, 0, 0, 0};

    // Dragonfly, balanced (a = 2p = 2h): p endpoints, a-1 local and h global ports per switch;
    // g groups of a switches, all-to-all inside a group, h global links per switch.
    int64_t pd = (k + 1) / 4, a = 2 * pd, h = pd;
    int64_t g = df_groups ? df_groups : a * h - 1;
    if (g < 2 || g > a * h + 1)
        return err_set(err, "network: Dragonfly groups %lld: between 2 and a*h+1 = %lld groups fit radix %lld",
                       (long long)g, (long long)(a * h + 1), (long long)k);
    int64_t local = g * a * (a - 1) / 2;
    out[4] = (PlanTopo){"DF", "Dragonfly", g * a * pd, g * a, local + g * a * h / 2, local, 0, 0};

    for (int i = 0; i < PLAN_NTOPO; i++) price(&out[i], p);
    return 0;
}
