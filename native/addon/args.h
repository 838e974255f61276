// Reading JavaScript arguments on the JS thread: config objects field by field, with errors
// that name the field's path, and converting the engine's resolved config back to JS.
#pragma once
#include <napi.h>

#include <cmath>
#include <set>
#include <string>

#include "sppo/config.h"

namespace sppo::addon {

using sppo::ModelConfig;

[[noreturn]] void throw_type(Napi::Env env, const std::string& msg);

// Reads a JS object field by field, refusing unknown keys and wrong types with the field's path.
class Fields {
 public:
  Fields(Napi::Env env, Napi::Value v, std::string path, std::set<std::string> known)
      : env_(env), path_(std::move(path)), known_(std::move(known)) {
    if (!v.IsObject() || v.IsArray()) throw_type(env, path_ + " must be an object");
    obj_ = v.As<Napi::Object>();
    Napi::Array keys = obj_.GetPropertyNames();
    for (uint32_t i = 0; i < keys.Length(); ++i) {
      std::string k = keys.Get(i).ToString();
      if (!known_.count(k)) throw_type(env, path_ + " has an unknown field '" + k + "'");
    }
  }
  bool has(const std::string& k) const { return obj_.Has(k) && !obj_.Get(k).IsUndefined() && !obj_.Get(k).IsNull(); }
  Napi::Value get(const std::string& k) const { return obj_.Get(k); }
  double number(const std::string& k, double fallback) const {
    if (!has(k)) return fallback;
    Napi::Value v = obj_.Get(k);
    if (!v.IsNumber()) throw_type(env_, name(k) + " must be a number, got " + type_of(v));
    double d = v.As<Napi::Number>().DoubleValue();
    if (!std::isfinite(d)) throw_type(env_, name(k) + " must be finite, got " + v.ToString().Utf8Value());
    return d;
  }
  int64_t integer(const std::string& k, int64_t fallback) const {
    double d = number(k, double(fallback));
    if (d != std::floor(d) || std::fabs(d) > 9007199254740991.0) throw_type(env_, name(k) + " must be an integer, got " + std::to_string(d));
    return int64_t(d);
  }
  bool boolean(const std::string& k, bool fallback) const {
    if (!has(k)) return fallback;
    Napi::Value v = obj_.Get(k);
    if (!v.IsBoolean()) throw_type(env_, name(k) + " must be a boolean, got " + type_of(v));
    return v.As<Napi::Boolean>().Value();
  }
  std::string string(const std::string& k, const std::string& fallback) const {
    if (!has(k)) return fallback;
    Napi::Value v = obj_.Get(k);
    if (!v.IsString()) throw_type(env_, name(k) + " must be a string, got " + type_of(v));
    return v.As<Napi::String>().Utf8Value();
  }
  std::string name(const std::string& k) const { return path_ + "." + k; }

 private:
  static std::string type_of(Napi::Value v) {
    switch (v.Type()) {
      case napi_string: return "a string";
      case napi_boolean: return "a boolean";
      case napi_number: return "a number";
      case napi_object: return v.IsArray() ? "an array" : "an object";
      default: return "a " + std::string(v.IsFunction() ? "function" : "value of another type");
    }
  }
  Napi::Env env_;
  std::string path_;
  std::set<std::string> known_;
  Napi::Object obj_;
};

int checked_int(Napi::Env env, int64_t v, const std::string& name);
ModelConfig parse_model_config(Napi::Env env, Napi::Value v);
sppo::OptimizerConfig parse_optimizer(Napi::Env env, Napi::Value v);
Napi::Object config_to_js(Napi::Env env, const ModelConfig& c);

}  // namespace sppo::addon
