// Errors the engine reports to its caller: always an exception with a message in the caller's
// terms (which field, which token, which tensor), never abort() or silent clamping.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace sppo {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

// SPPO_REQUIRE(cond, "config.hidden_size (", x, ") must be ...") throws sppo::Error.
#define SPPO_REQUIRE(cond, ...)                                            \
  do {                                                                     \
    if (!(cond)) throw ::sppo::Error(::sppo::detail::concat(__VA_ARGS__)); \
  } while (0)

}  // namespace sppo
