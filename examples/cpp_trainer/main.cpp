// Trains a small MLP with memopt::AdamMini, saves the optimizer with torch::save, reloads it into
// a fresh optimizer with torch::load and continues: the way a LibTorch trainer uses memopt_core.
// Writes OUT_DIR/{data,final}.pt (torch::pickle_save, readable by Python's torch.load) so the
// test suite can replay the same steps with the Python front end and compare.
#include <torch/torch.h>

#include <fstream>
#include <iostream>
#include <memopt/memopt.h>
#include <string>
#include <utility>
#include <vector>

namespace {

struct Net : torch::nn::Module {
  Net() {
    fc1 = register_module("fc1", torch::nn::Linear(8, 32));
    fc2 = register_module("fc2", torch::nn::Linear(32, 4));
  }
  torch::Tensor forward(const torch::Tensor& x) { return fc2(torch::tanh(fc1(x))); }
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
};

std::vector<std::pair<std::string, torch::Tensor>> named(torch::nn::Module& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : m.named_parameters()) out.emplace_back(item.key(), item.value());
  return out;
}

c10::Dict<std::string, torch::Tensor> snapshot(torch::nn::Module& m) {
  c10::Dict<std::string, torch::Tensor> out;
  for (const auto& item : m.named_parameters()) out.insert(item.key(), item.value().clone());
  return out;
}

void write(const std::string& path, const c10::IValue& value) {
  const auto bytes = torch::pickle_save(value);
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

void train(Net& net, memopt::AdamMini& opt, const torch::Tensor& x, const torch::Tensor& y,
           int steps, torch::optim::StepLR* sched) {
  for (int i = 0; i < steps; ++i) {
    opt.zero_grad();
    auto loss = torch::mse_loss(net.forward(x), y);
    loss.backward();
    opt.step();
    if (sched) sched->step();
    std::cout << "loss " << loss.item<double>() << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: cpp_trainer OUT_DIR\n";
    return 2;
  }
  const std::string out = argv[1];
  torch::manual_seed(0);
  Net net;
  const auto x = torch::randn({64, 8}), y = torch::randn({64, 4});
  c10::Dict<std::string, torch::Tensor> data;
  data.insert("x", x);
  data.insert("y", y);
  write(out + "/data.pt", data);
  write(out + "/init.pt", snapshot(net));

  const auto options = memopt::AdamMiniOptions(1e-2).betas({0.9, 0.95}).weight_decay(0.1);
  {
    memopt::AdamMini opt(named(net), options);
    torch::optim::StepLR sched(opt, /*step_size=*/2, /*gamma=*/0.5);
    train(net, opt, x, y, 3, &sched);  // lr 1e-2 x3; StepLR then halves it into the options
    torch::save(opt, out + "/optimizer.pt");
  }
  memopt::AdamMini resumed(named(net), options);
  torch::load(resumed, out + "/optimizer.pt");  // state and the scheduled lr come back
  train(net, resumed, x, y, 3, nullptr);
  write(out + "/final.pt", snapshot(net));
  std::cout << "ok\n";
  return 0;
}
