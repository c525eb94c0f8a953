// Generate showers from a caloman ONNX export with the ONNX Runtime C++ API alone.
//
//   onnx_inference model.onnx ENERGY_MEV COUNT out.bin [SEED]
//
// Reads the sidecar model.json beside the graph (written by `caloman export`, default
// "caloman" convention), draws the noise it asks for, runs the graph in batches and writes a
// plain little-endian binary file: int64 N, int64 V, then N float32 incident energies (MeV),
// then N x V float32 voxel energies (MeV, CaloChallenge (layer, alpha, r) order, row by row).
// docs/deployment.md shows how to build it and how to turn the file into CaloChallenge HDF5.

#include <onnxruntime_cxx_api.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// The number after "key": in the sidecar's flat "runtime" section (no JSON library needed).
double sidecar_number(const std::string& json, const std::string& key) {
  const std::string quoted = "\"" + key + "\":";
  const auto at = json.find(quoted);
  if (at == std::string::npos) throw std::runtime_error("model.json has no " + key);
  return std::strtod(json.c_str() + at + quoted.size(), nullptr);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

struct Model {
  int64_t n_normal, n_uniform, n_voxels;
  double energy_min, energy_max;
};

Model read_sidecar(const std::string& onnx_path) {
  const std::string json = read_text(onnx_path.substr(0, onnx_path.rfind('.')) + ".json");
  if (sidecar_number(json, "is_par04") != 0)
    throw std::runtime_error("this example runs the caloman convention; export without --convention par04");
  const auto weighted = json.find("\"weighted\":");  // absent in sidecars written before weighted exports
  if (weighted != std::string::npos && std::strtod(json.c_str() + weighted + 11, nullptr) != 0)
    throw std::runtime_error("this graph also outputs shower weights (a reweighted run), which this example "
                             "does not write; use examples/onnx_inference.py or export the base run");
  return {static_cast<int64_t>(sidecar_number(json, "n_normal")),
          static_cast<int64_t>(sidecar_number(json, "n_uniform")),
          static_cast<int64_t>(sidecar_number(json, "n_voxels")), sidecar_number(json, "energy_min_mev"),
          sidecar_number(json, "energy_max_mev")};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) {
    std::cerr << "usage: " << argv[0] << " model.onnx ENERGY_MEV COUNT out.bin [SEED]\n";
    return 2;
  }
  try {
    const std::string model_path = argv[1];
    const float energy = std::strtof(argv[2], nullptr);
    const int64_t count = std::atoll(argv[3]);
    const Model model = read_sidecar(model_path);
    if (energy < 0.99 * model.energy_min || energy > 1.01 * model.energy_max)
      throw std::runtime_error("energy outside the trained range " + std::to_string(model.energy_min) + ".." +
                               std::to_string(model.energy_max) + " MeV");

    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "caloman");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(1);
    options.SetInterOpNumThreads(1);
    Ort::Session session(env, model_path.c_str(), options);
    const auto memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

    std::mt19937_64 rng(argc > 5 ? std::strtoull(argv[5], nullptr, 10) : 0);
    std::normal_distribution<float> normal;
    const auto uniform = [&rng] { return static_cast<float>(rng() >> 40) * 0x1p-24f; };  // [0, 1), 24 bits

    std::vector<float> energies(count, energy), showers;
    showers.reserve(count * model.n_voxels);
    const int64_t batch_size = 1000;
    for (int64_t start = 0; start < count; start += batch_size) {
      const int64_t n = std::min(batch_size, count - start);
      std::vector<float> z(n * model.n_normal), u(n * model.n_uniform), e(n, energy);
      for (auto& x : z) x = normal(rng);
      for (auto& x : u) x = uniform();
      const std::array<int64_t, 2> z_shape{n, model.n_normal}, u_shape{n, model.n_uniform}, e_shape{n, 1};
      std::vector<Ort::Value> inputs;
      std::vector<const char*> names{"normal_noise"};
      inputs.push_back(Ort::Value::CreateTensor<float>(memory, z.data(), z.size(), z_shape.data(), 2));
      if (model.n_uniform > 0) {
        names.push_back("uniform_noise");
        inputs.push_back(Ort::Value::CreateTensor<float>(memory, u.data(), u.size(), u_shape.data(), 2));
      }
      names.push_back("incident_energy");
      inputs.push_back(Ort::Value::CreateTensor<float>(memory, e.data(), e.size(), e_shape.data(), 2));
      const char* output_names[] = {"showers"};
      auto outputs = session.Run(Ort::RunOptions{nullptr}, names.data(), inputs.data(), inputs.size(),
                                 output_names, 1);
      const float* voxels = outputs[0].GetTensorData<float>();
      showers.insert(showers.end(), voxels, voxels + n * model.n_voxels);
    }

    std::ofstream out(argv[4], std::ios::binary);
    const int64_t header[2] = {count, model.n_voxels};
    out.write(reinterpret_cast<const char*>(header), sizeof(header));
    out.write(reinterpret_cast<const char*>(energies.data()), energies.size() * sizeof(float));
    out.write(reinterpret_cast<const char*>(showers.data()), showers.size() * sizeof(float));
    if (!out) throw std::runtime_error(std::string("cannot write ") + argv[4]);
    std::cout << count << " showers of " << energy << " MeV written to " << argv[4] << "\n";
  } catch (const std::exception& error) {
    std::cerr << "onnx_inference: " << error.what() << "\n";
    return 2;
  }
  return 0;
}
