/*
 * esl_device.c - the device side of the edgeslm JSON command/ack protocol.
 *
 * A small JSON reader that knows exactly one shape (the command object of
 * docs/PROTOCOL.md), a ring of remembered command ids, and an ack writer. The reader
 * scans the whole payload before trusting any of it: a message that is not one
 * well-formed JSON object (valid UTF-8, nesting at most ESL_DEV_MAX_DEPTH, nothing
 * after the closing brace) is refused as a whole.
 */
#include "esl_device.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* --- reading JSON ------------------------------------------------------------------ */

typedef struct reader {
    const char *p;   /* next byte */
    const char *end; /* one past the last byte */
} reader;

/* A value as read: its kind and, for numbers, where its text is. */
enum kind { K_STRING, K_NUMBER, K_TRUE, K_FALSE, K_NULL, K_OTHER };

typedef struct value {
    enum kind kind;
    const char *num;  /* number text (not NUL-terminated) */
    size_t num_len;
    size_t str_len;   /* decoded string length in bytes, NUL excluded */
    int str_fits;     /* 1 when the decoded string fit the buffer */
    int str_has_nul;  /* 1 when the string decoded to a NUL byte (\u0000) */
} value;

static void skip_ws(reader *r) {
    while (r->p < r->end &&
           (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r')) {
        r->p++;
    }
}

static int hex4(const char *s, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return -1;
    }
    *out = v;
    return 0;
}

/* Appends one byte to a bounded string buffer; remembers when it did not fit. */
static void put_byte(char *buf, size_t cap, value *v, unsigned char c) {
    if (buf != NULL && v->str_len + 1 < cap) buf[v->str_len] = (char)c;
    else v->str_fits = 0;
    if (c == 0) v->str_has_nul = 1;
    v->str_len++;
}

static void put_utf8(char *buf, size_t cap, value *v, unsigned cp) {
    if (cp < 0x80) {
        put_byte(buf, cap, v, (unsigned char)cp);
    } else if (cp < 0x800) {
        put_byte(buf, cap, v, (unsigned char)(0xC0 | (cp >> 6)));
        put_byte(buf, cap, v, (unsigned char)(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        put_byte(buf, cap, v, (unsigned char)(0xE0 | (cp >> 12)));
        put_byte(buf, cap, v, (unsigned char)(0x80 | ((cp >> 6) & 0x3F)));
        put_byte(buf, cap, v, (unsigned char)(0x80 | (cp & 0x3F)));
    } else {
        put_byte(buf, cap, v, (unsigned char)(0xF0 | (cp >> 18)));
        put_byte(buf, cap, v, (unsigned char)(0x80 | ((cp >> 12) & 0x3F)));
        put_byte(buf, cap, v, (unsigned char)(0x80 | ((cp >> 6) & 0x3F)));
        put_byte(buf, cap, v, (unsigned char)(0x80 | (cp & 0x3F)));
    }
}

/* Length of the UTF-8 sequence at p (1-4), or 0 when it is not valid UTF-8
 * (overlong forms, surrogates and code points above U+10FFFF are invalid). */
static size_t utf8_len(const unsigned char *p, const unsigned char *end) {
    unsigned char c = p[0];
    size_t n;
    unsigned cp, min;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) n = 2, cp = c & 0x1F, min = 0x80;
    else if (c >= 0xE0 && c <= 0xEF) n = 3, cp = c & 0x0F, min = 0x800;
    else if (c >= 0xF0 && c <= 0xF4) n = 4, cp = c & 0x07, min = 0x10000;
    else return 0;
    if ((size_t)(end - p) < n) return 0;
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return n;
}

/* Reads a string at r->p (which is '"'), decoding into buf (may be NULL to skip).
 * Returns 0, or -1 on a syntax error. */
static int read_string(reader *r, char *buf, size_t cap, value *v) {
    v->kind = K_STRING;
    v->str_len = 0;
    v->str_fits = 1;
    v->str_has_nul = 0;
    r->p++; /* the opening quote */
    while (r->p < r->end) {
        unsigned char c = (unsigned char)*r->p;
        if (c == '"') {
            r->p++;
            if (buf != NULL && cap > 0) buf[v->str_fits ? v->str_len : cap - 1] = '\0';
            return 0;
        }
        if (c < 0x20) return -1; /* control characters must be escaped */
        if (c != '\\') {
            size_t n = utf8_len((const unsigned char *)r->p, (const unsigned char *)r->end);
            if (n == 0) return -1;
            for (size_t i = 0; i < n; i++) put_byte(buf, cap, v, (unsigned char)r->p[i]);
            r->p += n;
            continue;
        }
        if (r->end - r->p < 2) return -1;
        char e = r->p[1];
        r->p += 2;
        switch (e) {
        case '"': put_byte(buf, cap, v, '"'); break;
        case '\\': put_byte(buf, cap, v, '\\'); break;
        case '/': put_byte(buf, cap, v, '/'); break;
        case 'b': put_byte(buf, cap, v, '\b'); break;
        case 'f': put_byte(buf, cap, v, '\f'); break;
        case 'n': put_byte(buf, cap, v, '\n'); break;
        case 'r': put_byte(buf, cap, v, '\r'); break;
        case 't': put_byte(buf, cap, v, '\t'); break;
        case 'u': {
            unsigned cp, lo;
            if (r->end - r->p < 4 || hex4(r->p, &cp) != 0) return -1;
            r->p += 4;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return -1; /* a lone low surrogate */
            if (cp >= 0xD800 && cp <= 0xDBFF) {          /* needs its low half */
                if (r->end - r->p < 6 || r->p[0] != '\\' || r->p[1] != 'u' ||
                    hex4(r->p + 2, &lo) != 0 || lo < 0xDC00 || lo > 0xDFFF) {
                    return -1;
                }
                r->p += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            put_utf8(buf, cap, v, cp);
            break;
        }
        default:
            return -1;
        }
    }
    return -1; /* no closing quote */
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

/* Reads a number with JSON's grammar: -?(0|[1-9]d*)(.d+)?([eE][+-]?d+)? */
static int read_number(reader *r, value *v) {
    const char *s = r->p;
    if (r->p < r->end && *r->p == '-') r->p++;
    if (r->p >= r->end || !is_digit(*r->p)) return -1;
    if (*r->p == '0') r->p++;
    else while (r->p < r->end && is_digit(*r->p)) r->p++;
    if (r->p < r->end && *r->p == '.') {
        r->p++;
        if (r->p >= r->end || !is_digit(*r->p)) return -1;
        while (r->p < r->end && is_digit(*r->p)) r->p++;
    }
    if (r->p < r->end && (*r->p == 'e' || *r->p == 'E')) {
        r->p++;
        if (r->p < r->end && (*r->p == '+' || *r->p == '-')) r->p++;
        if (r->p >= r->end || !is_digit(*r->p)) return -1;
        while (r->p < r->end && is_digit(*r->p)) r->p++;
    }
    v->kind = K_NUMBER;
    v->num = s;
    v->num_len = (size_t)(r->p - s);
    return 0;
}

static int read_literal(reader *r, const char *word, enum kind kind, value *v) {
    size_t n = strlen(word);
    if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0) return -1;
    r->p += n;
    v->kind = kind;
    return 0;
}

/* Reads any value; strings decode into buf (NULL: skip), objects and arrays are
 * checked and skipped. `depth` counts the containers around this value. */
static int read_value(reader *r, char *buf, size_t cap, value *v, int depth) {
    skip_ws(r);
    if (r->p >= r->end) return -1;
    switch (*r->p) {
    case '"': return read_string(r, buf, cap, v);
    case 't': return read_literal(r, "true", K_TRUE, v);
    case 'f': return read_literal(r, "false", K_FALSE, v);
    case 'n': return read_literal(r, "null", K_NULL, v);
    case '{':
    case '[': {
        char close = *r->p == '{' ? '}' : ']';
        int is_object = close == '}';
        value inner;
        if (depth + 1 > ESL_DEV_MAX_DEPTH) return -1;
        r->p++;
        skip_ws(r);
        if (r->p < r->end && *r->p == close) {
            r->p++;
            v->kind = K_OTHER;
            return 0;
        }
        for (;;) {
            if (is_object) {
                skip_ws(r);
                if (r->p >= r->end || *r->p != '"') return -1;
                if (read_string(r, NULL, 0, &inner) != 0) return -1;
                skip_ws(r);
                if (r->p >= r->end || *r->p != ':') return -1;
                r->p++;
            }
            if (read_value(r, NULL, 0, &inner, depth + 1) != 0) return -1;
            skip_ws(r);
            if (r->p >= r->end) return -1;
            if (*r->p == ',') {
                r->p++;
                continue;
            }
            if (*r->p != close) return -1;
            r->p++;
            v->kind = K_OTHER;
            return 0;
        }
    }
    default:
        return read_number(r, v);
    }
}

/* The number a value holds, or NAN when it is not a finite number. The text (already
 * checked against JSON's grammar) is rewritten as at most 40 significant digits and an
 * exponent, so a number of any length reads in a small buffer: beyond 40 digits only
 * the last bit of a double could change. */
static double number_of(const value *v) {
    enum { DIGITS = 40 };
    char text[DIGITS + 16];
    const char *p = v->num, *end = v->num + v->num_len;
    size_t n = 0, neg = 0;
    long exp10 = 0, e = 0;
    int e_neg = 0, seen_point = 0;
    if (v->kind != K_NUMBER) return NAN;
    if (p < end && *p == '-') neg = 1, p++;

    /* digits: skip leading zeros, keep DIGITS, count the rest into the exponent */
    for (; p < end && (is_digit(*p) || *p == '.'); p++) {
        if (*p == '.') {
            seen_point = 1;
            continue;
        }
        if (n == 0 && *p == '0') {
            if (seen_point) exp10--;
            continue;
        }
        if (n < DIGITS) {
            text[neg + n++] = *p;
            if (seen_point) exp10--;
        } else if (!seen_point) {
            exp10++;
        }
    }

    /* the exponent, saturated far beyond what a double can hold */
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) e_neg = *p++ == '-';
        for (; p < end; p++) {
            if (e < 100000) e = e * 10 + (*p - '0');
        }
    }
    if (n == 0) return neg ? -0.0 : 0.0;
    exp10 += e_neg ? -e : e;
    if (neg) text[0] = '-';
    snprintf(text + neg + n, sizeof text - neg - n, "e%ld", exp10);
    double x = strtod(text, NULL);
    return isfinite(x) ? x : NAN;
}

/* 1 when x is a whole number JSON carries exactly: |x| <= 2^53 - 1. */
static int is_whole(double x) {
    return !isnan(x) && x == floor(x) && fabs(x) <= 9007199254740991.0;
}

/* --- the command object ------------------------------------------------------------- */

enum field { F_V, F_ID, F_DEVICE, F_ACTION, F_VALUE, F_EXPIRES, F_REPLY_TO, N_FIELDS };

static const char *const FIELD_NAMES[N_FIELDS] = {
    "v", "id", "device", "action", "value", "expires", "reply_to",
};

static const char *const ACTION_NAMES[] = {
    "on", "off", "open", "close", "brightness", "position", "temperature",
};
#define N_ACTIONS (sizeof ACTION_NAMES / sizeof ACTION_NAMES[0])

static int is_value_action(esl_dev_action a) {
    return a == ESL_ACT_BRIGHTNESS || a == ESL_ACT_POSITION || a == ESL_ACT_TEMPERATURE;
}

static int valid_id(const char *s, size_t len) {
    if (len == 0 || len >= ESL_DEV_ID_MAX) return 0;
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || is_digit(c) ||
                 c == '_' || c == '-';
        if (!ok) return 0;
    }
    return 1;
}

/* A reply topic a device may publish to: no wildcards, not a $-topic, and not empty. */
static int valid_topic(const char *s) {
    return s[0] != '\0' && s[0] != '$' && strpbrk(s, "+#") == NULL;
}

/* What reading the object found, before the checks that need every field. */
typedef struct scan {
    int present[N_FIELDS];
    int bad_type;        /* a known field has the wrong type or does not fit */
    int repeated;        /* a known field appears twice */
    int id_ok;
    char action[16];
    int action_fits;
    double v, expires;
} scan;

static void take_field(enum field f, const value *v, esl_dev_cmd *cmd, scan *s) {
    switch (f) {
    case F_ID:
        s->id_ok = v->kind == K_STRING && v->str_fits && !v->str_has_nul &&
                   valid_id(cmd->id, v->str_len);
        if (!s->id_ok) cmd->id[0] = '\0';
        break;
    case F_DEVICE:
        if (v->kind != K_STRING || !v->str_fits || v->str_has_nul || v->str_len == 0) {
            s->bad_type = 1;
            cmd->device[0] = '\0';
        }
        break;
    case F_ACTION:
        if (v->kind != K_STRING) s->bad_type = 1;
        s->action_fits = v->kind == K_STRING && v->str_fits && !v->str_has_nul;
        break;
    case F_REPLY_TO:
        if (v->kind != K_STRING || !v->str_fits || v->str_has_nul ||
            !valid_topic(cmd->reply_to)) {
            s->bad_type = 1;
            cmd->reply_to[0] = '\0';
        }
        break;
    case F_VALUE:
        if (v->kind == K_NUMBER) {
            cmd->value = number_of(v);
            cmd->has_value = 1; /* NaN when not finite: refused below */
        } else if (v->kind != K_NULL) { /* null: no value */
            s->bad_type = 1;
        }
        break;
    case F_V:
    case F_EXPIRES: {
        double x = number_of(v);
        if (!is_whole(x) || x < 0.0) s->bad_type = 1;
        if (f == F_V) s->v = x;
        else s->expires = x;
        break;
    }
    default:
        break;
    }
}

/* The buffer a known field's string decodes into; NULL for other fields. */
static char *field_buffer(enum field f, esl_dev_cmd *cmd, scan *s, size_t *cap) {
    switch (f) {
    case F_ID: *cap = sizeof cmd->id; return cmd->id;
    case F_DEVICE: *cap = sizeof cmd->device; return cmd->device;
    case F_REPLY_TO: *cap = sizeof cmd->reply_to; return cmd->reply_to;
    case F_ACTION: *cap = sizeof s->action; return s->action;
    default: *cap = 0; return NULL;
    }
}

static int read_command(reader *r, esl_dev_cmd *cmd, scan *s) {
    skip_ws(r);
    if (r->p >= r->end || *r->p != '{') return -1;
    r->p++;
    skip_ws(r);
    if (r->p < r->end && *r->p == '}') {
        r->p++;
        return 0;
    }
    for (;;) {
        char key[16];
        value k, v;
        size_t cap;
        int f = N_FIELDS;

        /* the key, then which field it names */
        skip_ws(r);
        if (r->p >= r->end || *r->p != '"') return -1;
        if (read_string(r, key, sizeof key, &k) != 0) return -1;
        if (k.str_fits && !k.str_has_nul) {
            for (f = 0; f < N_FIELDS && strcmp(key, FIELD_NAMES[f]) != 0; f++) {
            }
        }
        skip_ws(r);
        if (r->p >= r->end || *r->p != ':') return -1;
        r->p++;

        /* the value: known fields are decoded, anything else is checked and skipped */
        if (f < N_FIELDS && s->present[f]) s->repeated = 1;
        char *buf = f < N_FIELDS ? field_buffer((enum field)f, cmd, s, &cap) : NULL;
        if (f < N_FIELDS && s->present[f]) buf = NULL; /* keep the first value */
        if (read_value(r, buf, buf ? cap : 0, &v, 1) != 0) return -1;
        if (f < N_FIELDS && !s->present[f]) {
            s->present[f] = 1;
            take_field((enum field)f, &v, cmd, s);
        }

        skip_ws(r);
        if (r->p >= r->end) return -1;
        if (*r->p == ',') {
            r->p++;
            continue;
        }
        if (*r->p != '}') return -1;
        r->p++;
        return 0;
    }
}

/* 0 when the whole payload is one well-formed object (and nothing after it). */
static int read_whole(const char *json, size_t len, esl_dev_cmd *cmd, scan *s) {
    reader r;
    if (json == NULL) return -1;
    r.p = json;
    r.end = json + len;
    if (read_command(&r, cmd, s) != 0) return -1;
    skip_ws(&r);
    return r.p == r.end ? 0 : -1;
}

esl_dev_status esl_dev_parse(const char *json, size_t len, esl_dev_cmd *cmd) {
    scan s;
    if (cmd == NULL || (json == NULL && len > 0)) return ESL_DEV_E_ARG;
    memset(cmd, 0, sizeof *cmd);
    memset(&s, 0, sizeof s);

    /* 1. the whole payload must be one well-formed object */
    if (read_whole(json, len, cmd, &s) != 0) {
        memset(cmd, 0, sizeof *cmd);
        return ESL_DEV_E_JSON;
    }

    /* 2. an id to answer to */
    if (!s.present[F_ID] || !s.id_ok) return ESL_DEV_E_NO_ID;

    /* 3. every required field present once, with its type */
    if (s.bad_type || s.repeated || !s.present[F_V] || !s.present[F_DEVICE] ||
        !s.present[F_ACTION] || !s.present[F_EXPIRES]) {
        return ESL_DEV_E_FIELD;
    }
    cmd->version = (int)s.v;
    cmd->expires = (int64_t)s.expires;
    if (s.v != ESL_DEV_PROTOCOL) return ESL_DEV_E_VERSION;

    /* 4. a known action, with a value exactly when it takes one */
    size_t a = 0;
    while (s.action_fits && a < N_ACTIONS && strcmp(s.action, ACTION_NAMES[a]) != 0) a++;
    if (!s.action_fits || a == N_ACTIONS) return ESL_DEV_E_ACTION;
    cmd->action = (esl_dev_action)a;
    if (is_value_action(cmd->action) != cmd->has_value) {
        return ESL_DEV_E_VALUE;
    }
    if (cmd->has_value) {
        double x = cmd->value;
        int percent = cmd->action == ESL_ACT_BRIGHTNESS || cmd->action == ESL_ACT_POSITION;
        if (isnan(x) || (percent && (x < 0.0 || x > 100.0))) return ESL_DEV_E_VALUE;
    }
    return ESL_DEV_OK;
}

/* --- the device ------------------------------------------------------------------- */

esl_dev_status esl_dev_init(esl_dev *dev, const char *device_id, esl_dev_apply_fn apply,
                            void *user, const esl_dev_state *initial) {
    if (dev == NULL || device_id == NULL || apply == NULL) return ESL_DEV_E_ARG;
    size_t n = strlen(device_id);
    if (n == 0 || n >= sizeof dev->id) return ESL_DEV_E_ARG;
    for (size_t i = 0; i < n; i++) {
        char c = device_id[i];
        if (c <= ' ' || c > '~' || c == '"' || c == '\\') return ESL_DEV_E_ARG;
    }
    memset(dev, 0, sizeof *dev);
    memcpy(dev->id, device_id, n + 1);
    dev->apply = apply;
    dev->user = user;
    if (initial != NULL) dev->state = *initial;
    return ESL_DEV_OK;
}

int esl_dev_seen(const esl_dev *dev, const char *id) {
    if (dev == NULL || id == NULL) return 0;
    for (unsigned i = 0; i < dev->seen_count; i++) {
        if (strcmp(dev->seen[i], id) == 0) return 1;
    }
    return 0;
}

/* Remembers an id, forgetting the oldest when the ring is full. */
static void remember(esl_dev *dev, const char *id) {
    size_t n = strlen(id);
    memcpy(dev->seen[dev->seen_next], id, n + 1);
    dev->seen_next = (dev->seen_next + 1) % ESL_DEV_SEEN;
    if (dev->seen_count < ESL_DEV_SEEN) dev->seen_count++;
}

esl_dev_status esl_dev_handle(esl_dev *dev, const char *payload, size_t len, int64_t now,
                              esl_dev_cmd *cmd, char *ack, size_t cap, size_t *ack_len) {
    esl_dev_status st;
    if (dev == NULL || cmd == NULL || ack == NULL || ack_len == NULL || cap == 0) {
        return ESL_DEV_E_ARG;
    }
    *ack_len = 0;
    ack[0] = '\0';

    /* parse; without a trusted id there is nobody to answer */
    st = esl_dev_parse(payload, len, cmd);
    if (st == ESL_DEV_E_JSON || st == ESL_DEV_E_NO_ID || st == ESL_DEV_E_ARG) return st;

    /* checks in the order docs/PROTOCOL.md gives them */
    if (st == ESL_DEV_OK && strcmp(cmd->device, dev->id) != 0) st = ESL_DEV_E_DEVICE;
    if (st == ESL_DEV_OK && esl_dev_seen(dev, cmd->id)) st = ESL_DEV_DUPLICATE;
    if (st == ESL_DEV_OK && now > 0 && cmd->expires > 0 && now > cmd->expires) {
        st = ESL_DEV_E_EXPIRED;
    }

    /* act once, and remember that we did */
    if (st == ESL_DEV_OK) {
        st = dev->apply(dev->user, cmd, &dev->state);
        if (st != ESL_DEV_OK && st != ESL_DEV_E_UNSUPPORTED) st = ESL_DEV_E_FAILED;
        if (st == ESL_DEV_OK) remember(dev, cmd->id);
    }

    const char *error = st == ESL_DEV_OK || st == ESL_DEV_DUPLICATE ? NULL
                                                                    : esl_dev_strerror(st);
    int n = esl_dev_ack_write(ack, cap, cmd->id, dev->id, st, &dev->state, error);
    if (n < 0) {
        ack[0] = '\0';
        return ESL_DEV_E_SPACE;
    }
    *ack_len = (size_t)n;
    return st;
}

/* --- writing the ack --------------------------------------------------------------- */

typedef struct writer {
    char *out;
    size_t cap;
    size_t len;
    int full; /* something did not fit */
} writer;

static void w_raw(writer *w, const char *s, size_t n) {
    if (w->full || w->len + n + 1 > w->cap) {
        w->full = 1;
        return;
    }
    memcpy(w->out + w->len, s, n);
    w->len += n;
    w->out[w->len] = '\0';
}

static void w_str(writer *w, const char *s) { w_raw(w, s, strlen(s)); }

/* A JSON string: quotes, and escapes for '"', '\' and control characters. */
static void w_json_string(writer *w, const char *s) {
    w_raw(w, "\"", 1);
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            w_raw(w, esc, 2);
        } else if (c < 0x20) {
            char esc[8];
            int n = snprintf(esc, sizeof esc, "\\u%04x", c);
            w_raw(w, esc, (size_t)n);
        } else {
            w_raw(w, (const char *)&c, 1);
        }
    }
    w_raw(w, "\"", 1);
}

static void w_number(writer *w, double x) {
    char text[32];
    int n = snprintf(text, sizeof text, "%.10g", isfinite(x) ? x : 0.0);
    w_raw(w, text, (size_t)n);
}

static void w_state(writer *w, const esl_dev_state *state) {
    static const char *const POWER[] = {NULL, "ON", "OFF", "OPEN", "CLOSED"};
    const char *sep = "";
    w_str(w, "{");
    if (state->power > ESL_POWER_UNKNOWN && state->power <= ESL_POWER_CLOSED) {
        w_str(w, "\"state\":");
        w_json_string(w, POWER[state->power]);
        sep = ",";
    }
    if (state->has_brightness) {
        w_str(w, sep);
        w_str(w, "\"brightness\":");
        w_number(w, state->brightness);
        sep = ",";
    }
    if (state->has_position) {
        w_str(w, sep);
        w_str(w, "\"position\":");
        w_number(w, state->position);
        sep = ",";
    }
    if (state->has_temperature) {
        w_str(w, sep);
        w_str(w, "\"temperature\":");
        w_number(w, state->temperature);
    }
    w_str(w, "}");
}

int esl_dev_ack_write(char *out, size_t cap, const char *id, const char *device,
                      esl_dev_status status, const esl_dev_state *state,
                      const char *error) {
    const char *name = esl_dev_ack_status(status);
    writer w = {out, cap, 0, 0};
    if (out == NULL || id == NULL || device == NULL || name == NULL || cap == 0) return -1;
    out[0] = '\0';
    w_str(&w, "{\"id\":");
    w_json_string(&w, id);
    w_str(&w, ",\"device\":");
    w_json_string(&w, device);
    w_str(&w, ",\"status\":");
    w_json_string(&w, name);
    if (state != NULL) {
        w_str(&w, ",\"state\":");
        w_state(&w, state);
    }
    if (error != NULL) {
        w_str(&w, ",\"error\":");
        w_json_string(&w, error);
    }
    w_str(&w, "}");
    if (w.full) {
        out[0] = '\0';
        return -1;
    }
    return (int)w.len;
}

const char *esl_dev_ack_status(esl_dev_status status) {
    switch (status) {
    case ESL_DEV_OK: return "ok";
    case ESL_DEV_DUPLICATE: return "duplicate";
    case ESL_DEV_E_FIELD:
    case ESL_DEV_E_VERSION:
    case ESL_DEV_E_DEVICE:
    case ESL_DEV_E_ACTION:
    case ESL_DEV_E_VALUE: return "invalid";
    case ESL_DEV_E_EXPIRED: return "expired";
    case ESL_DEV_E_UNSUPPORTED: return "unsupported";
    case ESL_DEV_E_FAILED: return "error";
    default: return NULL;
    }
}

const char *esl_dev_strerror(esl_dev_status status) {
    switch (status) {
    case ESL_DEV_OK: return "carried out";
    case ESL_DEV_DUPLICATE: return "carried out before; not repeated";
    case ESL_DEV_E_JSON: return "not one well-formed JSON object";
    case ESL_DEV_E_NO_ID: return "no valid command id";
    case ESL_DEV_E_FIELD: return "a field is missing, repeated or of the wrong type";
    case ESL_DEV_E_VERSION: return "unsupported protocol version";
    case ESL_DEV_E_DEVICE: return "command for another device";
    case ESL_DEV_E_ACTION: return "unknown action";
    case ESL_DEV_E_VALUE: return "value missing, unexpected or out of range";
    case ESL_DEV_E_EXPIRED: return "command expired before it could run";
    case ESL_DEV_E_UNSUPPORTED: return "this device cannot do that";
    case ESL_DEV_E_FAILED: return "the device failed to carry it out";
    case ESL_DEV_E_SPACE: return "ack buffer too small";
    case ESL_DEV_E_ARG: return "bad argument";
    default: return "unknown status";
    }
}
