/* Using a tdc bundle from your own C program.
 *
 *   tdc compile examples/lenet.py --batch 1 -o out/lenet
 *   gcc -O2 -std=c11 -Iout/lenet examples/embed/embed.c out/lenet/model.o RUNTIME_LINK_ARGS -o embed
 *   ./embed out/lenet/model.weights x.f32      (x.f32: the input as raw float32, C order)
 *
 * RUNTIME_LINK_ARGS: python -c "from tdc.backends.llvm.runtime import build_runtime; print(*build_runtime().link_args())"
 * model.h says everything the program needs: the entry point, the buffer sizes, and each
 * input's and output's shape. The program prints every output value, one per line.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

static void *read_exactly(const char *path, long offset_from_end, size_t n) {
    FILE *f = fopen(path, "rb");
    void *buf = aligned_alloc(64, n ? (n + 63) / 64 * 64 : 64);
    if (!f || !buf || fseek(f, offset_from_end ? -offset_from_end : 0, offset_from_end ? SEEK_END : SEEK_SET) != 0
        || fread(buf, 1, n, f) != n) {
        fprintf(stderr, "embed: cannot read %zu bytes from %s\n", n, path);
        exit(1);
    }
    fclose(f);
    return buf;
}

int main(int argc, char **argv) {
    if (argc != 2 + TDC_NUM_INPUTS) {
        fprintf(stderr, "usage: %s WEIGHTS_FILE INPUT.raw ... (%d raw C-order inputs)\n", argv[0], TDC_NUM_INPUTS);
        return 2;
    }
    /* A tdc weights file ends with the TDC_WEIGHTS_BYTES the model reads (its header is before them). */
    void *weights = read_exactly(argv[1], TDC_WEIGHTS_BYTES, TDC_WEIGHTS_BYTES);
    void *scratch = aligned_alloc(64, TDC_SCRATCH_BYTES ? TDC_SCRATCH_BYTES : 64);
    const void *inputs[TDC_NUM_INPUTS];
    void *outputs[TDC_NUM_OUTPUTS];
    for (int i = 0; i < TDC_NUM_INPUTS; i++)
        inputs[i] = read_exactly(argv[2 + i], 0, (size_t)TDC_INPUTS[i].nbytes);
    for (int i = 0; i < TDC_NUM_OUTPUTS; i++)
        outputs[i] = malloc(TDC_OUTPUTS[i].nbytes ? (size_t)TDC_OUTPUTS[i].nbytes : 1);
    int64_t rc = TDC_RUN(inputs, outputs, weights, scratch);
    if (rc != 0) {
        fprintf(stderr, "embed: the model failed (code %lld)\n", (long long)rc);
        return 1;
    }
    for (int i = 0; i < TDC_NUM_OUTPUTS; i++) {
        if (TDC_OUTPUTS[i].dtype != TDC_F32) continue;
        const float *y = outputs[i];
        for (int64_t k = 0; k < TDC_OUTPUTS[i].nbytes / 4; k++) printf("%.9g\n", y[k]);
    }
    return 0;
}
