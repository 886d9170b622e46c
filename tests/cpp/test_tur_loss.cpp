// C++ test of tur::task_uncertainty_loss through the dispatcher, as a libtorch user calls it: values and
// gradients against the DESIGN.md §1 formulas written out in double, for Cu = C and Cu = 1 with an absent task.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <vector>

namespace {

using Result = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                          at::Tensor>;

int failures = 0;

void expect_close(double got, double want, double tol, const char* what) {
  if (!(std::abs(got - want) <= tol * (1.0 + std::abs(want)))) {
    std::printf("FAIL %s: got %.12g want %.12g\n", what, got, want);
    ++failures;
  }
}

void check_case(int64_t cu) {
  const int64_t B = 5, C = 3, H = 6, W = 7, K = 4, P = H * W;
  const double eps = 1e-6, lam = 2.0;
  torch::manual_seed(cu);
  auto pred = torch::randn({B, C, H, W}, torch::kDouble);
  auto target = torch::randn({B, C, H, W}, torch::kDouble);
  auto unc = torch::rand({B, cu, H, W}, torch::kDouble) + 0.1;
  auto ids = torch::tensor({0, 2, 2, 0, 3}, torch::kLong);  // task 1 absent

  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("tur::task_uncertainty_loss", "")
                .typed<Result(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                              double, double, bool)>();
  auto [loss, per_task, l1, wl1, reg, counts, grad_pred, grad_unc] =
      op.call(pred, target, unc, ids, K, eps, lam, true);

  auto p = pred.accessor<double, 4>();
  auto t = target.accessor<double, 4>();
  auto u = unc.accessor<double, 4>();
  auto gp = grad_pred.accessor<double, 4>();
  auto gu = grad_unc.accessor<double, 4>();
  std::vector<int64_t> task = {0, 2, 2, 0, 3};
  const int M = 3;
  double total = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    std::vector<int64_t> members;
    for (int64_t i = 0; i < B; ++i)
      if (task[i] == k) members.push_back(i);
    const double n = static_cast<double>(members.size());
    expect_close(counts[k].item<int64_t>(), n, 0, "counts");
    if (members.empty()) {
      expect_close(per_task[k].item<double>(), 0.0, 0, "absent task loss");
      continue;
    }
    double wsum = 0.0, usum = 0.0;
    std::vector<double> U(cu * P), E(cu * P, 0.0);
    for (int64_t c = 0; c < cu; ++c)
      for (int64_t x = 0; x < P; ++x) {
        double s = 0.0;
        for (auto i : members) s += u[i][c][x / W][x % W];
        U[c * P + x] = s / n + eps;
        usum += U[c * P + x];
      }
    for (auto i : members)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t x = 0; x < P; ++x) E[(cu == 1 ? 0 : c) * P + x] += std::abs(p[i][c][x / W][x % W] - t[i][c][x / W][x % W]);
    for (int64_t j = 0; j < cu * P; ++j) wsum += E[j] / U[j];
    const double m = usum / (cu * P);
    const double loss_k = wsum / (n * C * P) + lam * std::log(m);
    expect_close(per_task[k].item<double>(), loss_k, 1e-12, "per-task loss");
    total += loss_k;
    for (auto i : members)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t x = 0; x < P; ++x) {
          const double d = p[i][c][x / W][x % W] - t[i][c][x / W][x % W];
          const double sign = (d > 0) - (d < 0);
          const int64_t j = (cu == 1 ? 0 : c) * P + x;
          expect_close(gp[i][c][x / W][x % W], sign / (M * n * C * P * U[j]), 1e-12, "grad_pred");
        }
    for (auto i : members)
      for (int64_t c = 0; c < cu; ++c)
        for (int64_t x = 0; x < P; ++x) {
          const int64_t j = c * P + x;
          const double want = (-E[j] / (n * C * P * U[j] * U[j]) + lam / (cu * P * m)) / (M * n);
          expect_close(gu[i][c][x / W][x % W], want, 1e-12, "grad_uncertainty");
        }
  }
  expect_close(loss.item<double>(), total / M, 1e-12, "loss");

  // A bad argument is a c10::ValueError naming it.
  bool raised = false;
  try {
    op.call(pred, target, unc, ids, 0, eps, lam, false);
  } catch (const c10::ValueError& e) {
    raised = std::string(e.what()).find("num_tasks") != std::string::npos;
  }
  if (!raised) {
    std::printf("FAIL num_tasks=0 did not raise a ValueError naming num_tasks\n");
    ++failures;
  }
}

}  // namespace

int main() {
  check_case(3);
  check_case(1);
  if (failures == 0) std::printf("tur_ops_test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
