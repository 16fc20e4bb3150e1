/*
 * kvcache.c - KV-cache shift (drop a span, move the rest down, re-rotate keys) and the
 * versioned save/restore file format. Buffers are caller-owned; nothing here allocates.
 *
 * File format v1 (little-endian; docs/KERNEL.md and edgeslm/kvcache.py mirror it):
 *   0  char[8] "EDGESLKV"     8 u32 version = 1     12 u32 header bytes = 64
 *   16 i32 n_layers  20 i32 n_kv_heads  24 i32 max_seq_len  28 i32 head_dim
 *   32 i32 rotary_dim  36 i32 length  40 f64 rope_theta  48 i64 n_tokens
 *   56 u32 dtype = 1 (float32) or 2 (IEEE half)  60 u32 CRC-32 of bytes [0, 60)
 *   64 i32 tokens[n_tokens], then for each layer, k/v, head: length * head_dim values of
 *   the dtype, then u32 CRC-32 of everything after the header.
 */
#include "edgeslm_kernel.h"
#include "esl_internal.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define ESL_KV_MAGIC "EDGESLKV"
#define ESL_KV_VERSION 1u
#define ESL_KV_HEADER_BYTES 64
#define ESL_KV_DTYPE_F32 1u
#define ESL_KV_DTYPE_F16 2u
#define ESL_KV_DIM_MAX (1 << 24)

/* Returns ESL_OK when desc describes a valid geometry (see esl_kv_desc). */
static int32_t esl__kv_check(const esl_kv_desc *d)
{
    if (!d)
        return ESL_ERR_ARG;
    if (d->n_layers < 1 || d->n_kv_heads < 1 || d->max_seq_len < 1 || d->head_dim < 1 ||
        d->n_layers > ESL_KV_DIM_MAX || d->n_kv_heads > ESL_KV_DIM_MAX ||
        d->max_seq_len > ESL_KV_DIM_MAX || d->head_dim > ESL_KV_DIM_MAX)
        return ESL_ERR_ARG;
    if (d->length < 0 || d->length > d->max_seq_len)
        return ESL_ERR_ARG;
    if (d->rotary_dim < 0 || d->rotary_dim > d->head_dim || d->rotary_dim % 2 != 0)
        return ESL_ERR_ARG;
    if (d->half != 0 && d->half != 1)
        return ESL_ERR_ARG;
    if (d->rotary_dim > 0 ? !(d->rope_theta > 0.0 && d->rope_theta <= DBL_MAX)
                          : d->rope_theta != 0.0)
        return ESL_ERR_ARG;
    return ESL_OK;
}

/* Bytes of one cached value: 4 (float32) or 2 (IEEE half). */
static size_t esl__kv_elem(const esl_kv_desc *d) { return d->half ? 2u : 4u; }

/* Returns the first value of (layer, kv, head) in a buffer of geometry d. */
static unsigned char *esl__kv_row0(const esl_kv_desc *d, void *data, int32_t l, int32_t kv,
                                   int32_t h)
{
    size_t plane = ((size_t)l * 2 + (size_t)kv) * (size_t)d->n_kv_heads + (size_t)h;
    return (unsigned char *)data +
           plane * (size_t)d->max_seq_len * (size_t)d->head_dim * esl__kv_elem(d);
}

/* Rotates one stored key's first 2 * half values by the pairs (cos, sin), in double. */
static void esl__kv_rotate(const esl_kv_desc *d, unsigned char *key, int32_t half,
                           const double *cos_sin)
{
    int32_t i;
    for (i = 0; i < half; i++) {
        double c = cos_sin[2 * i], s = cos_sin[2 * i + 1], a, b;
        if (d->half) {
            uint16_t *r = (uint16_t *)key;
            a = esl__half(r[i]);
            b = esl__half(r[i + half]);
            r[i] = esl__half_from((float)(a * c - b * s));
            r[i + half] = esl__half_from((float)(a * s + b * c));
        } else {
            float *r = (float *)key;
            a = r[i];
            b = r[i + half];
            r[i] = (float)(a * c - b * s);
            r[i + half] = (float)(a * s + b * c);
        }
    }
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_kv_shift(const esl_kv_desc *desc, void *data, int32_t keep, int32_t drop,
                     const double *cos_sin)
{
    int32_t st = esl__kv_check(desc), l, kv, h, pos, moved, half;
    size_t stride;
    if (st != ESL_OK)
        return st;
    if (!data || keep < 0 || drop < 0 || drop > desc->length - keep)
        return ESL_ERR_ARG;
    if (drop == 0)
        return ESL_OK;
    if (desc->rotary_dim > 0 && !cos_sin)
        return ESL_ERR_ARG;
    moved = desc->length - keep - drop;
    stride = (size_t)desc->head_dim * esl__kv_elem(desc); /* bytes per position */
    half = desc->rotary_dim / 2;
    if (moved == 0)
        return ESL_OK;
    for (l = 0; l < desc->n_layers; l++)
        for (kv = 0; kv < 2; kv++)
            for (h = 0; h < desc->n_kv_heads; h++) {
                unsigned char *row0 = esl__kv_row0(desc, data, l, kv, h);
                memmove(row0 + (size_t)keep * stride, row0 + (size_t)(keep + drop) * stride,
                        (size_t)moved * stride);
                if (kv != 0 || half == 0)
                    continue;
                for (pos = keep; pos < keep + moved; pos++)
                    esl__kv_rotate(desc, row0 + (size_t)pos * stride, half, cos_sin);
            }
    return ESL_OK;
}

/* ---- CRC-32 (IEEE 802.3, reflected, as zlib.crc32), slicing by 8. ---- */

typedef struct esl_crc_tables {
    uint32_t t[8][256];
} esl_crc_tables;

/* Fills the eight lookup tables (about 2k table entries; done once per save/load call). */
static void esl__crc_init(esl_crc_tables *ct)
{
    uint32_t b, c;
    int k, j;
    for (b = 0; b < 256; b++) {
        c = b;
        for (j = 0; j < 8; j++)
            c = (c & 1u) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        ct->t[0][b] = c;
    }
    for (b = 0; b < 256; b++)
        for (k = 1; k < 8; k++)
            ct->t[k][b] = (ct->t[k - 1][b] >> 8) ^ ct->t[0][ct->t[k - 1][b] & 0xFFu];
}

/* Continues a CRC-32 (same convention as zlib.crc32(buf, crc)) over n bytes of buf. */
static uint32_t esl__crc_update(const esl_crc_tables *ct, uint32_t crc, const void *buf,
                                size_t n)
{
    const unsigned char *p = (const unsigned char *)buf;
    uint32_t c = ~crc;
    while (n >= 8) {
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
                           (uint32_t)p[3] << 24);
        c = ct->t[7][lo & 0xFFu] ^ ct->t[6][(lo >> 8) & 0xFFu] ^ ct->t[5][(lo >> 16) & 0xFFu] ^
            ct->t[4][lo >> 24] ^ ct->t[3][p[4]] ^ ct->t[2][p[5]] ^ ct->t[1][p[6]] ^
            ct->t[0][p[7]];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = ct->t[0][(c ^ *p++) & 0xFFu] ^ (c >> 8);
    return ~c;
}

/* ---- Header encoding (explicit little-endian, independent of host struct layout). ---- */

static void esl__put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static uint32_t esl__get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void esl__put_u64(unsigned char *p, uint64_t v)
{
    esl__put_u32(p, (uint32_t)v);
    esl__put_u32(p + 4, (uint32_t)(v >> 32));
}

static uint64_t esl__get_u64(const unsigned char *p)
{
    return (uint64_t)esl__get_u32(p) | (uint64_t)esl__get_u32(p + 4) << 32;
}

/* Returns 1 on a little-endian host (the payload is written in host order). */
static int esl__little_endian(void)
{
    const uint32_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

/* Serializes desc and n_tokens into the 64-byte header hdr (with its CRC). */
static void esl__kv_encode(const esl_crc_tables *ct, const esl_kv_desc *d, int64_t n_tokens,
                           unsigned char *hdr)
{
    uint64_t theta_bits;
    memset(hdr, 0, ESL_KV_HEADER_BYTES);
    memcpy(hdr, ESL_KV_MAGIC, 8);
    esl__put_u32(hdr + 8, ESL_KV_VERSION);
    esl__put_u32(hdr + 12, ESL_KV_HEADER_BYTES);
    esl__put_u32(hdr + 16, (uint32_t)d->n_layers);
    esl__put_u32(hdr + 20, (uint32_t)d->n_kv_heads);
    esl__put_u32(hdr + 24, (uint32_t)d->max_seq_len);
    esl__put_u32(hdr + 28, (uint32_t)d->head_dim);
    esl__put_u32(hdr + 32, (uint32_t)d->rotary_dim);
    esl__put_u32(hdr + 36, (uint32_t)d->length);
    memcpy(&theta_bits, &d->rope_theta, 8);
    esl__put_u64(hdr + 40, theta_bits);
    esl__put_u64(hdr + 48, (uint64_t)n_tokens);
    esl__put_u32(hdr + 56, d->half ? ESL_KV_DTYPE_F16 : ESL_KV_DTYPE_F32);
    esl__put_u32(hdr + 60, esl__crc_update(ct, 0, hdr, 60));
}

/* Returns the bytes after the header for this geometry and token count. */
static uint64_t esl__kv_body_bytes(const esl_kv_desc *d, int64_t n_tokens)
{
    uint64_t values = (uint64_t)d->n_layers * 2u * (uint64_t)d->n_kv_heads *
                      (uint64_t)d->length * (uint64_t)d->head_dim;
    return 4u * (uint64_t)n_tokens + esl__kv_elem(d) * values + 4u;
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_kv_save(const char *path, const esl_kv_desc *desc, const void *data,
                    const int32_t *tokens, int64_t n_tokens)
{
    esl_crc_tables ct;
    unsigned char hdr[ESL_KV_HEADER_BYTES], tail[4];
    uint32_t crc = 0;
    int32_t l, kv, h, st = esl__kv_check(desc);
    size_t row;
    FILE *f;
    int ok;
    if (st != ESL_OK)
        return st;
    if (!path || !data || n_tokens < 0 || n_tokens > INT32_MAX || (n_tokens > 0 && !tokens) ||
        !esl__little_endian())
        return ESL_ERR_ARG;
    esl__crc_init(&ct);
    esl__kv_encode(&ct, desc, n_tokens, hdr);
    f = fopen(path, "wb");
    if (!f)
        return ESL_ERR_IO;
    ok = fwrite(hdr, 1, sizeof hdr, f) == sizeof hdr;
    if (ok && n_tokens > 0) {
        ok = fwrite(tokens, sizeof(int32_t), (size_t)n_tokens, f) == (size_t)n_tokens;
        crc = esl__crc_update(&ct, crc, tokens, (size_t)n_tokens * sizeof(int32_t));
    }
    row = (size_t)desc->length * (size_t)desc->head_dim * esl__kv_elem(desc); /* bytes */
    for (l = 0; ok && l < desc->n_layers; l++)
        for (kv = 0; ok && kv < 2; kv++)
            for (h = 0; ok && h < desc->n_kv_heads; h++) {
                const unsigned char *src = esl__kv_row0(desc, (void *)data, l, kv, h);
                ok = fwrite(src, 1, row, f) == row;
                crc = esl__crc_update(&ct, crc, src, row);
            }
    esl__put_u32(tail, crc);
    ok = ok && fwrite(tail, 1, 4, f) == 4;
    ok = (fclose(f) == 0) && ok;
    return ok ? ESL_OK : ESL_ERR_IO;
}

/* Reads and validates the header of the open file f; fills d and *n_tokens. */
static int32_t esl__kv_read_header_f(const esl_crc_tables *ct, FILE *f, esl_kv_desc *d,
                                     int64_t *n_tokens)
{
    unsigned char hdr[ESL_KV_HEADER_BYTES];
    uint64_t theta_bits, nt, expect;
    size_t got = fread(hdr, 1, sizeof hdr, f);
    long size;
    if (got < 8)
        return (got > 0 && memcmp(hdr, ESL_KV_MAGIC, got) != 0) ? ESL_ERR_BAD_MAGIC
                                                                 : ESL_ERR_TRUNCATED;
    if (memcmp(hdr, ESL_KV_MAGIC, 8) != 0)
        return ESL_ERR_BAD_MAGIC;
    if (got < 12)
        return ESL_ERR_TRUNCATED;
    if (esl__get_u32(hdr + 8) != ESL_KV_VERSION)
        return ESL_ERR_BAD_VERSION;
    if (got < sizeof hdr)
        return ESL_ERR_TRUNCATED;
    if (esl__get_u32(hdr + 60) != esl__crc_update(ct, 0, hdr, 60) ||
        esl__get_u32(hdr + 12) != ESL_KV_HEADER_BYTES ||
        (esl__get_u32(hdr + 56) != ESL_KV_DTYPE_F32 &&
         esl__get_u32(hdr + 56) != ESL_KV_DTYPE_F16))
        return ESL_ERR_BAD_HEADER;
    d->half = esl__get_u32(hdr + 56) == ESL_KV_DTYPE_F16;
    d->n_layers = (int32_t)esl__get_u32(hdr + 16);
    d->n_kv_heads = (int32_t)esl__get_u32(hdr + 20);
    d->max_seq_len = (int32_t)esl__get_u32(hdr + 24);
    d->head_dim = (int32_t)esl__get_u32(hdr + 28);
    d->rotary_dim = (int32_t)esl__get_u32(hdr + 32);
    d->length = (int32_t)esl__get_u32(hdr + 36);
    theta_bits = esl__get_u64(hdr + 40);
    memcpy(&d->rope_theta, &theta_bits, 8);
    nt = esl__get_u64(hdr + 48);
    if (esl__kv_check(d) != ESL_OK || nt > (uint64_t)INT32_MAX)
        return ESL_ERR_BAD_HEADER;
    *n_tokens = (int64_t)nt;
    expect = ESL_KV_HEADER_BYTES + esl__kv_body_bytes(d, (int64_t)nt);
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) < 0)
        return ESL_ERR_IO;
    if ((uint64_t)size < expect)
        return ESL_ERR_TRUNCATED;
    if ((uint64_t)size > expect)
        return ESL_ERR_TRAILING;
    if (fseek(f, ESL_KV_HEADER_BYTES, SEEK_SET) != 0)
        return ESL_ERR_IO;
    return ESL_OK;
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_kv_read_header(const char *path, esl_kv_desc *desc, int64_t *n_tokens)
{
    esl_crc_tables ct;
    FILE *f;
    int32_t st;
    if (!path || !desc || !n_tokens)
        return ESL_ERR_ARG;
    esl__crc_init(&ct);
    f = fopen(path, "rb");
    if (!f)
        return ESL_ERR_IO;
    st = esl__kv_read_header_f(&ct, f, desc, n_tokens);
    fclose(f);
    return st;
}

/* Contract: see edgeslm_kernel.h. */
int32_t esl_kv_load(const char *path, const esl_kv_desc *desc, void *data, int32_t *tokens,
                    int64_t n_tokens)
{
    esl_crc_tables ct;
    esl_kv_desc fd;
    unsigned char tail[4];
    int64_t fn = 0;
    uint32_t crc = 0;
    int32_t l, kv, h, st = esl__kv_check(desc);
    size_t row;
    FILE *f;
    if (st != ESL_OK)
        return st;
    if (!path || !data || n_tokens < 0 || (n_tokens > 0 && !tokens) || !esl__little_endian())
        return ESL_ERR_ARG;
    esl__crc_init(&ct);
    f = fopen(path, "rb");
    if (!f)
        return ESL_ERR_IO;
    st = esl__kv_read_header_f(&ct, f, &fd, &fn);
    if (st == ESL_OK &&
        (fd.n_layers != desc->n_layers || fd.n_kv_heads != desc->n_kv_heads ||
         fd.head_dim != desc->head_dim || fd.rotary_dim != desc->rotary_dim ||
         fd.rope_theta != desc->rope_theta || fd.length != desc->length ||
         fd.half != desc->half ||
         desc->max_seq_len < fd.length || fn != n_tokens))
        st = ESL_ERR_MISMATCH;
    if (st == ESL_OK && n_tokens > 0) {
        if (fread(tokens, sizeof(int32_t), (size_t)n_tokens, f) != (size_t)n_tokens)
            st = ESL_ERR_TRUNCATED;
        else
            crc = esl__crc_update(&ct, crc, tokens, (size_t)n_tokens * sizeof(int32_t));
    }
    row = (size_t)desc->length * (size_t)desc->head_dim * esl__kv_elem(desc); /* bytes */
    for (l = 0; st == ESL_OK && l < desc->n_layers; l++)
        for (kv = 0; st == ESL_OK && kv < 2; kv++)
            for (h = 0; st == ESL_OK && h < desc->n_kv_heads; h++) {
                unsigned char *dst = esl__kv_row0(desc, data, l, kv, h);
                if (fread(dst, 1, row, f) != row)
                    st = ESL_ERR_TRUNCATED;
                else
                    crc = esl__crc_update(&ct, crc, dst, row);
            }
    if (st == ESL_OK) {
        if (fread(tail, 1, 4, f) != 4)
            st = ESL_ERR_TRUNCATED;
        else if (esl__get_u32(tail) != crc)
            st = ESL_ERR_CHECKSUM;
    }
    if (st == ESL_ERR_TRUNCATED && ferror(f))
        st = ESL_ERR_IO;
    fclose(f);
    return st;
}
