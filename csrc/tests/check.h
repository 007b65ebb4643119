// Minimal assertion helpers for the C++ unit tests (no test framework needed).
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>

static int g_failures = 0;

#define EXPECT(cond)                                                         \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: EXPECT failed: %s\n", __FILE__, __LINE__, \
                   #cond);                                                  \
      ++g_failures;                                                         \
    }                                                                       \
  } while (0)

#define CHECK_NEAR(a, b, tol) EXPECT(std::fabs(double(a) - double(b)) <= (tol))

#define TEST_MAIN_END()                                                 \
  do {                                                                  \
    if (g_failures) std::fprintf(stderr, "%d check(s) failed\n", g_failures); \
    else std::printf("all checks passed\n");                            \
    return g_failures ? EXIT_FAILURE : EXIT_SUCCESS;                    \
  } while (0)
