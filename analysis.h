/*
The paper's layer diagnostics, run on a trained model and validation data (./train --analyze):

  angular_distance[l][n-1], for l = 0..L-1 and n = 1..L-l: arccos(cos_sim(h_l, h_{l+n})) / pi between
      the inputs of layer l and layer l+n (h_0 the token embeddings, h_L the last layer's output),
      at the last token of each sequence, averaged over all sequences. Near 0 means the n layers
      in between barely change the representation (the deep Pre-LN layers, in the paper).
  layer_drop[l]: the validation loss with layer l skipped, its input passed straight to the next
      layer; next to the full model's loss it says how much the model relies on that layer.
  hidden_rms[l], for l = 0..L: the root mean square of h_l over every token and channel, the
      residual stream's scale at each layer boundary. Pre-LN lets it grow with depth (each layer
      adds its unnormalised branch), which is what shrinks the deep layers' share of it; a Post-LN
      layer's output is its norm's output, of the scale of the norm's weight.

On one document per row (the loader's pad_id, train's --pad-id) "the last token of each sequence"
is each row's last token that is not padding (the document's end), hidden_rms is over the
positions that are not padding, and the losses are means over the targets (padding has none).

Cosines and sums of squares are computed in double from the fp32 hidden states; arccos of a value
clamped to [-1, 1].
dev/reference.py's `analyze` implements the same definitions independently; the tests compare.
*/
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "dataloader.h"
#include "json.h"
#include "model.h"

// A validation batch's weight in the mean loss: its targets (every target counts alike), or, with
// batch_means (--val-mean batches, the paper's code's way), 1 for a batch with targets and 0 for
// one without.
inline double validation_batch_weight(int targets, bool batch_means) {
    return batch_means ? (targets > 0 ? 1.0 : 0.0) : (double)targets;
}

struct Analysis {
    double val_loss = 0;                                // the full model's mean loss (--val-mean)
    size_t tokens = 0;                                  // target tokens evaluated
    std::vector<std::vector<double>> angular_distance;  // [l][n-1], a triangle
    std::vector<double> layer_drop_loss;                // [l] loss with layer l skipped
    std::vector<double> hidden_rms;                     // [l] for l = 0..L: RMS of h_l
};

// Runs the diagnostics over the first max_batches whole windows of the loader (all if 0); the
// losses are means over the targets, or with batch_means the means of the batches' means.
inline Analysis model_analyze(Model* model, DataLoader* loader, int max_batches, bool batch_means) {
    const ModelConfig& c = model->config;
    const int L = c.num_layers, C = c.channels, B = model->B, T = model->T;
    size_t batches = dataloader_num_batches(loader);
    if (max_batches > 0 && (size_t)max_batches < batches) batches = (size_t)max_batches;
    Analysis result;
    result.angular_distance.assign(L, {});
    for (int l = 0; l < L; l++) result.angular_distance[l].assign(L - l, 0.0);
    result.layer_drop_loss.assign(L, 0.0);
    result.hidden_rms.assign(L + 1, 0.0);   // sums of squares until the end
    std::vector<float> states((size_t)B * (L + 1) * C);   // (B, L+1, C) h_0 .. h_L of each sequence's last token
    std::vector<int> last_position(B);   // (B) each sequence's last token that is not padding
    std::vector<char> is_padding((size_t)B * T);   // (B, T)
    size_t positions = 0;   // the positions the RMS is over
    double loss_weights = 0;   // the losses' divisor: the targets, or the batches with targets
    dataloader_reset(loader);
    for (size_t batch = 0; batch < batches; batch++) {
        dataloader_next_batch(loader);
        model->skip_layer = -1;
        model_forward(model, loader->inputs, loader->targets);
        // the loss means: each batch's weighted by its targets, or by 1 (validation_batch_weight)
        const double weight = validation_batch_weight(model->target_count, batch_means);
        result.val_loss += model->mean_loss * weight;
        loss_weights += weight;
        result.tokens += (size_t)model->target_count;
        // which positions are padding (a stream has none), and each row's last token that is not
        for (int b = 0; b < B; b++) {
            last_position[b] = 0;
            for (int t = 0; t < T; t++) {
                is_padding[(size_t)b * T + t] = loader->pad_id >= 0 && loader->inputs[b * T + t] == loader->pad_id;
                if (is_padding[(size_t)b * T + t]) continue;
                last_position[b] = t;
                positions++;
            }
        }
        for (int l = 0; l <= L; l++) {
            // h_l of the whole batch, in either storage type
            auto stream = [&](const auto& a) {
                return l == 0 ? a.embedded : layer_output(layer_activations(a, c, B, T, l - 1), c, l - 1);
            };
            std::vector<real> h = model_activations_to_host(model, stream, 0, (size_t)B * T * C);   // (B, T, C)
            // its sum of squares over the positions that are not padding, for the RMS
            double sum_squares = 0;
            for (size_t p = 0; p < (size_t)B * T; p++) {
                if (is_padding[p]) continue;
                for (int i = 0; i < C; i++) sum_squares += (double)h[p * C + i] * h[p * C + i];
            }
            result.hidden_rms[l] += sum_squares;
            // the last token of each sequence, for the angular distances
            for (int b = 0; b < B; b++) {
                const real* last = &h[((size_t)b * T + last_position[b]) * C];
                for (int i = 0; i < C; i++) states[((size_t)b * (L + 1) + l) * C + i] = (float)last[i];
            }
        }
        for (int b = 0; b < B; b++) {
            for (int l = 0; l < L; l++) {
                for (int n = 1; l + n <= L; n++) {
                    const float* x = &states[((size_t)b * (L + 1) + l) * C];
                    const float* y = &states[((size_t)b * (L + 1) + l + n) * C];
                    double dot = 0, xx = 0, yy = 0;
                    for (int i = 0; i < C; i++) {
                        dot += (double)x[i] * y[i];
                        xx += (double)x[i] * x[i];
                        yy += (double)y[i] * y[i];
                    }
                    double cosine = dot / (sqrt(xx) * sqrt(yy) + 1e-30);
                    cosine = cosine > 1 ? 1 : cosine < -1 ? -1 : cosine;
                    result.angular_distance[l][n - 1] += acos(cosine) / M_PI;
                }
            }
        }
        // the same batch with each layer left out in turn, without running again the layers before
        // the one left out: before the pass without layer l, the activations of layers 0 .. l-2
        // hold the full pass's values and layer l-1's do not (the pass without it left them as the
        // pass before wrote them, from another input). So the pass
        // without layer l resumes at layer l-1, from layer l-2's output, and leaves layers 0 .. l-1
        // as the full pass had them, for the next. The same losses to the bit as whole passes
        // (test_model.cpp), with L + (L-1) + L(L-1)/2 layers run per batch instead of L + L(L-1):
        // 89 instead of 144 at L = 12
        for (int l = 0; l < L; l++) {
            model->skip_layer = l;
            model->resume_layer = l >= 1 ? l - 1 : 0;
            model_forward(model, loader->inputs, loader->targets);
            result.layer_drop_loss[l] += model->mean_loss * weight;
        }
        model->skip_layer = -1;
        model->resume_layer = 0;
    }
    model->backward_ready = false;
    // means: over the targets (or the batches), the sequences, and the positions that are not padding
    double divisor = loss_weights > 0 ? loss_weights : 1.0;   // (no target: losses 0)
    result.val_loss /= divisor;
    for (double& loss : result.layer_drop_loss) loss /= divisor;
    for (auto& row : result.angular_distance) {
        for (double& d : row) d /= (double)batches * B;
    }
    for (double& rms : result.hidden_rms) rms = sqrt(rms / ((double)(positions > 0 ? positions : 1) * C));
    return result;
}

inline std::string analysis_to_json(const Analysis& a) {
    auto number = [](double v) {
        char buf[32];
        snprintf(buf, sizeof(buf), "%.9g", v);
        return std::string(buf);
    };
    std::string json = "{\n  \"val_loss\": " + number(a.val_loss) + ",\n  \"tokens\": " + std::to_string(a.tokens) +
                       ",\n  \"angular_distance\": [";
    for (size_t l = 0; l < a.angular_distance.size(); l++) {
        json += l ? ",\n    [" : "\n    [";
        for (size_t n = 0; n < a.angular_distance[l].size(); n++) json += (n ? ", " : "") + number(a.angular_distance[l][n]);
        json += "]";
    }
    json += "\n  ],\n  \"hidden_rms\": [";
    for (size_t l = 0; l < a.hidden_rms.size(); l++) json += (l ? ", " : "") + number(a.hidden_rms[l]);
    json += "],\n  \"layer_drop\": [";
    for (size_t l = 0; l < a.layer_drop_loss.size(); l++) {
        json += std::string(l ? ",\n    " : "\n    ") + "{\"layer\": " + std::to_string(l) + ", \"val_loss\": " +
                number(a.layer_drop_loss[l]) + "}";
    }
    return json + "\n  ]\n}\n";
}
