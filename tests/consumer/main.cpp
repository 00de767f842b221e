// Groups a small label matrix with the installed core and checks the answer.
#include <cobalance/pattern_table.hpp>

#include <cstdint>
#include <iostream>
#include <vector>

int main() {
  // 5 samples, 3 classes; rows 0, 2 and 4 share a pattern.
  const std::vector<std::uint8_t> labels{1, 0, 1,  0, 1, 0,  1, 0, 1,  0, 0, 0,  1, 0, 1};
  cobalance::PatternTableBuilder builder(3);
  builder.expect_samples(5);
  builder.add_dense(labels.data(), 5);
  const cobalance::PatternTable table = builder.finish();
  const std::vector<cobalance::index_t> counts{3, 1, 1};
  const cobalance::InverseVector inverse{0, 1, 0, 2, 0};
  if (table.n_patterns() != 3 || table.counts() != counts || table.inverse() != inverse) {
    std::cerr << "consumer: unexpected pattern table\n";
    return 1;
  }
  std::cout << "consumer: cobalance::core linked, " << table.n_patterns() << " patterns\n";
  return 0;
}
