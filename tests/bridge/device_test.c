/*
 * device_test.c - host tests of firmware_bridge/device/esl_device.c.
 *
 * Built and run by tests/test_bridge_device.py with gcc (warnings as errors, and the
 * address and undefined-behaviour sanitizers when the compiler has them).
 *
 *   device_test            run the unit tests; prints "ok <n> checks" and exits 0
 *   device_test --stdin N  a driver for the Python fuzz tests: reads records
 *                          (4-byte big-endian length, then the payload) from stdin,
 *                          hands each to one device "light.kitchen" with now = N, and
 *                          prints one line per record: "<status> <ack or ->"
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "esl_device.h"

static int checks, failures;

#define CHECK(cond)                                                        \
    do {                                                                   \
        checks++;                                                          \
        if (!(cond)) {                                                     \
            failures++;                                                    \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                  \
    } while (0)

/* --- a light that counts what it was asked to do ----------------------------------- */

typedef struct light {
    int applied;           /* calls that changed something */
    esl_dev_status answer; /* what apply returns (ESL_DEV_OK normally) */
} light;

static esl_dev_status light_apply(void *user, const esl_dev_cmd *cmd, esl_dev_state *state) {
    light *l = user;
    if (l->answer != ESL_DEV_OK) return l->answer;
    switch (cmd->action) {
    case ESL_ACT_ON: state->power = ESL_POWER_ON; break;
    case ESL_ACT_OFF: state->power = ESL_POWER_OFF; break;
    case ESL_ACT_BRIGHTNESS:
        state->has_brightness = 1;
        state->brightness = cmd->value;
        state->power = cmd->value > 0 ? ESL_POWER_ON : ESL_POWER_OFF;
        break;
    default: return ESL_DEV_E_UNSUPPORTED;
    }
    l->applied++;
    return ESL_DEV_OK;
}

static esl_dev_status parse(const char *json) {
    esl_dev_cmd cmd;
    return esl_dev_parse(json, strlen(json), &cmd);
}

/* Handles `json` on `dev`; returns the status and leaves the ack in `ack`. */
static esl_dev_status handle(esl_dev *dev, const char *json, long long now, char *ack,
                             size_t cap) {
    esl_dev_cmd cmd;
    size_t n = 12345;
    esl_dev_status st = esl_dev_handle(dev, json, strlen(json), now, &cmd, ack, cap, &n);
    CHECK(n == strlen(ack));
    return st;
}

#define CMD(fields) "{\"v\":1,\"device\":\"light.kitchen\",\"expires\":2000000000," fields "}"

/* --- parsing ------------------------------------------------------------------------ */

static void test_parse_valid(void) {
    esl_dev_cmd cmd;
    const char *json =
        " {\"v\": 1, \"id\": \"r1-0\", \"device\": \"light.kitchen\", \"action\": "
        "\"brightness\", \"value\": 30.5, \"expires\": 1767225600, \"reply_to\": "
        "\"edgeslm\\/default\\/bridge\\/pi\\/ack\"}\n";
    CHECK(esl_dev_parse(json, strlen(json), &cmd) == ESL_DEV_OK);
    CHECK(cmd.version == 1);
    CHECK(strcmp(cmd.id, "r1-0") == 0);
    CHECK(strcmp(cmd.device, "light.kitchen") == 0);
    CHECK(cmd.action == ESL_ACT_BRIGHTNESS);
    CHECK(cmd.has_value && cmd.value == 30.5);
    CHECK(cmd.expires == 1767225600LL);
    CHECK(strcmp(cmd.reply_to, "edgeslm/default/bridge/pi/ack") == 0);

    /* every action; a value only where one belongs; null is no value */
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"on\"")) == ESL_DEV_OK);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"off\",\"value\":null")) == ESL_DEV_OK);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"open\"")) == ESL_DEV_OK);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"close\"")) == ESL_DEV_OK);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"position\",\"value\":0")) == ESL_DEV_OK);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"temperature\",\"value\":-2.5e1")) ==
          ESL_DEV_OK);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"brightness\",\"value\":100")) == ESL_DEV_OK);

    /* unknown keys are skipped, however nested, and may come anywhere */
    CHECK(parse("{\"x\":{\"a\":[1,2,{\"b\":null}],\"c\":\"\\u00e9\"},\"v\":1,\"id\":\"a\","
                "\"device\":\"d\",\"action\":\"on\",\"expires\":0,\"y\":[]}") == ESL_DEV_OK);

    /* escapes decode: \u00e9 is two UTF-8 bytes, a surrogate pair four */
    json = CMD("\"id\":\"a\",\"action\":\"on\",\"reply_to\":\"t/\\u00e9/\\ud83d\\ude00\"");
    CHECK(esl_dev_parse(json, strlen(json), &cmd) == ESL_DEV_OK);
    CHECK(strcmp(cmd.reply_to, "t/\xc3\xa9/\xf0\x9f\x98\x80") == 0);

    /* numbers of any length: 40 significant digits are kept, the exponent is exact */
    char big[900];
    snprintf(big, sizeof big, CMD("\"id\":\"a\",\"action\":\"temperature\","
                                  "\"value\":-0.%0300d12e+303"), 5);
    CHECK(esl_dev_parse(big, strlen(big), &cmd) == ESL_DEV_OK);
    CHECK(fabs(cmd.value + 5120.0) < 1e-9); /* -0.(299 zeros)512 x 10^303 */
    snprintf(big, sizeof big, CMD("\"id\":\"a\",\"action\":\"temperature\","
                                  "\"value\":1%0400de-400"), 0);
    CHECK(esl_dev_parse(big, strlen(big), &cmd) == ESL_DEV_OK && cmd.value == 1.0);
    snprintf(big, sizeof big, CMD("\"id\":\"a\",\"action\":\"brightness\","
                                  "\"value\":99.%0300d9"), 9);
    CHECK(esl_dev_parse(big, strlen(big), &cmd) == ESL_DEV_OK && cmd.value == 99.0);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"temperature\",\"value\":1e99999999")) ==
          ESL_DEV_E_VALUE);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"temperature\",\"value\":0e99999999")) ==
          ESL_DEV_OK);

    /* the payload need not be NUL-terminated: only len bytes are read */
    char buf[128];
    const char *exact = CMD("\"id\":\"a\",\"action\":\"on\"");
    size_t n = strlen(exact);
    memcpy(buf, exact, n);
    memset(buf + n, '}', sizeof buf - n);
    CHECK(esl_dev_parse(buf, n, &cmd) == ESL_DEV_OK);
    CHECK(esl_dev_parse(buf, n + 1, &cmd) == ESL_DEV_E_JSON);
}

static void test_parse_not_json(void) {
    const char *bad[] = {
        "",
        "   ",
        "{",
        "[]",
        "null",
        "\"id\"",
        "{\"id\":\"a\"} x",
        "{\"id\":\"a\",}",
        "{'id':'a'}",
        "{\"id\":\"a\" \"v\":1}",
        "{\"id\":01}",
        "{\"id\":1.}",
        "{\"id\":-}",
        "{\"id\":.5}",
        "{\"id\":NaN}",
        "{\"id\":Infinity}",
        "{\"id\":tru}",
        "{\"id\":\"a\xff\"}",              /* invalid UTF-8 */
        "{\"id\":\"a\xc0\xaf\"}",          /* overlong form */
        "{\"id\":\"\xed\xa0\x80\"}",       /* an encoded surrogate */
        "{\"id\":\"\\ud800\"}",            /* a lone high surrogate */
        "{\"id\":\"\\udc00\"}",            /* a lone low surrogate */
        "{\"id\":\"\\x41\"}",              /* not a JSON escape */
        "{\"id\":\"\\u12\"}",
        "{\"id\":\"tab\there\"}",          /* a raw control character */
        "{\"id\":\"unterminated}",
        "{\"a\":[[[[[[[[1]]]]]]]]}",       /* nesting 9 deep */
        "\xef\xbb\xbf{}",                  /* a byte order mark */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        esl_dev_status st = parse(bad[i]);
        CHECK(st == ESL_DEV_E_JSON);
        if (st != ESL_DEV_E_JSON) fprintf(stderr, "  payload %zu: %s\n", i, bad[i]);
    }
    CHECK(parse("{\"a\":[[[[[[[1]]]]]]]}") == ESL_DEV_E_NO_ID); /* 8 deep is fine */
    CHECK(esl_dev_parse(NULL, 0, &(esl_dev_cmd){0}) == ESL_DEV_E_JSON);
    CHECK(esl_dev_parse(NULL, 3, &(esl_dev_cmd){0}) == ESL_DEV_E_ARG);
    CHECK(esl_dev_parse("{}", 2, NULL) == ESL_DEV_E_ARG);
}

static void test_parse_field_errors(void) {
    char id65[80] = "{\"id\":\"";
    memset(id65 + 7, 'a', 65);
    strcpy(id65 + 72, "\"}");

    /* no id to answer to */
    CHECK(parse("{}") == ESL_DEV_E_NO_ID);
    CHECK(parse(CMD("\"action\":\"on\"")) == ESL_DEV_E_NO_ID);
    CHECK(parse(CMD("\"id\":7,\"action\":\"on\"")) == ESL_DEV_E_NO_ID);
    CHECK(parse(CMD("\"id\":\"\",\"action\":\"on\"")) == ESL_DEV_E_NO_ID);
    CHECK(parse(CMD("\"id\":\"a/b\",\"action\":\"on\"")) == ESL_DEV_E_NO_ID);
    CHECK(parse(CMD("\"id\":\"a\\u0000\",\"action\":\"on\"")) == ESL_DEV_E_NO_ID);
    CHECK(parse(id65) == ESL_DEV_E_NO_ID);
    id65[7 + 64] = '"';
    id65[7 + 65] = '}';
    id65[7 + 66] = '\0';
    CHECK(parse(id65) == ESL_DEV_E_FIELD); /* 64 characters: an id, the rest missing */

    /* fields missing, repeated, of the wrong type */
    CHECK(parse("{\"id\":\"a\",\"device\":\"d\",\"action\":\"on\",\"expires\":1}") ==
          ESL_DEV_E_FIELD);
    CHECK(parse("{\"id\":\"a\",\"v\":1,\"action\":\"on\",\"expires\":1}") == ESL_DEV_E_FIELD);
    CHECK(parse("{\"id\":\"a\",\"v\":1,\"device\":\"d\",\"action\":\"on\"}") ==
          ESL_DEV_E_FIELD);
    CHECK(parse("{\"id\":\"a\",\"v\":1,\"device\":\"d\",\"expires\":1}") == ESL_DEV_E_FIELD);
    CHECK(parse(CMD("\"id\":\"a\",\"id\":\"b\",\"action\":\"on\"")) == ESL_DEV_E_FIELD);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"on\",\"action\":\"off\"")) ==
          ESL_DEV_E_FIELD);
    CHECK(parse("{\"v\":\"1\",\"id\":\"a\",\"device\":\"d\",\"action\":\"on\",\"expires\":1}") ==
          ESL_DEV_E_FIELD);
    CHECK(parse("{\"v\":true,\"id\":\"a\",\"device\":\"d\",\"action\":\"on\",\"expires\":1}") ==
          ESL_DEV_E_FIELD);
    CHECK(parse("{\"v\":1,\"id\":\"a\",\"device\":\"d\",\"action\":\"on\",\"expires\":1.5}") ==
          ESL_DEV_E_FIELD);
    CHECK(parse("{\"v\":1,\"id\":\"a\",\"device\":\"d\",\"action\":\"on\",\"expires\":-1}") ==
          ESL_DEV_E_FIELD);
    CHECK(parse("{\"v\":1,\"id\":\"a\",\"device\":\"\",\"action\":\"on\",\"expires\":1}") ==
          ESL_DEV_E_FIELD);
    CHECK(parse("{\"v\":1,\"id\":\"a\",\"device\":[],\"action\":\"on\",\"expires\":1}") ==
          ESL_DEV_E_FIELD);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":7")) == ESL_DEV_E_FIELD);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"brightness\",\"value\":\"30\"")) ==
          ESL_DEV_E_FIELD);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"on\",\"reply_to\":\"a/#\"")) ==
          ESL_DEV_E_FIELD);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"on\",\"reply_to\":\"a/+/b\"")) ==
          ESL_DEV_E_FIELD);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"on\",\"reply_to\":\"$SYS/x\"")) ==
          ESL_DEV_E_FIELD);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"on\",\"reply_to\":\"\"")) == ESL_DEV_E_FIELD);

    /* the id is still read, so the device can say what was wrong */
    esl_dev_cmd cmd;
    const char *json = CMD("\"id\":\"kept\",\"action\":\"on\",\"reply_to\":\"a/#\"");
    CHECK(esl_dev_parse(json, strlen(json), &cmd) == ESL_DEV_E_FIELD);
    CHECK(strcmp(cmd.id, "kept") == 0 && cmd.reply_to[0] == '\0');

    /* version, action, value */
    CHECK(parse("{\"v\":2,\"id\":\"a\",\"device\":\"d\",\"action\":\"on\",\"expires\":1}") ==
          ESL_DEV_E_VERSION);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"toggle\"")) == ESL_DEV_E_ACTION);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"ON\"")) == ESL_DEV_E_ACTION);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"a-very-long-action-name\"")) ==
          ESL_DEV_E_ACTION);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"brightness\"")) == ESL_DEV_E_VALUE);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"brightness\",\"value\":null")) ==
          ESL_DEV_E_VALUE);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"on\",\"value\":5")) == ESL_DEV_E_VALUE);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"brightness\",\"value\":100.01")) ==
          ESL_DEV_E_VALUE);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"position\",\"value\":-1")) ==
          ESL_DEV_E_VALUE);
    CHECK(parse(CMD("\"id\":\"a\",\"action\":\"temperature\",\"value\":1e999")) ==
          ESL_DEV_E_VALUE);
}

/* --- the device --------------------------------------------------------------------- */

static void test_handle(void) {
    esl_dev dev;
    light l = {0, ESL_DEV_OK};
    char ack[ESL_DEV_ACK_MAX];
    esl_dev_state off = {ESL_POWER_OFF, 0, 0, 0, 0, 0, 0};

    CHECK(esl_dev_init(&dev, "light.kitchen", light_apply, &l, &off) == ESL_DEV_OK);
    CHECK(esl_dev_init(&dev, "has space", light_apply, &l, NULL) == ESL_DEV_E_ARG);
    CHECK(esl_dev_init(&dev, "", light_apply, &l, NULL) == ESL_DEV_E_ARG);
    CHECK(esl_dev_init(&dev, "quo\"te", light_apply, &l, NULL) == ESL_DEV_E_ARG);
    CHECK(esl_dev_init(&dev, "light.kitchen", NULL, &l, NULL) == ESL_DEV_E_ARG);
    CHECK(esl_dev_init(&dev, "light.kitchen", light_apply, &l, &off) == ESL_DEV_OK);

    /* carried out once, acked with the new state */
    const char *on = CMD("\"id\":\"r1-0\",\"action\":\"brightness\",\"value\":40");
    CHECK(handle(&dev, on, 1000, ack, sizeof ack) == ESL_DEV_OK);
    CHECK(strcmp(ack, "{\"id\":\"r1-0\",\"device\":\"light.kitchen\",\"status\":\"ok\","
                      "\"state\":{\"state\":\"ON\",\"brightness\":40}}") == 0);
    CHECK(l.applied == 1 && esl_dev_seen(&dev, "r1-0"));

    /* the same id again: answered, not repeated */
    CHECK(handle(&dev, on, 1000, ack, sizeof ack) == ESL_DEV_DUPLICATE);
    CHECK(strcmp(ack, "{\"id\":\"r1-0\",\"device\":\"light.kitchen\",\"status\":"
                      "\"duplicate\",\"state\":{\"state\":\"ON\",\"brightness\":40}}") == 0);
    CHECK(l.applied == 1);

    /* another device's command, an expired one, a broken one */
    const char *other = "{\"v\":1,\"id\":\"r2-0\",\"device\":\"light.desk\",\"action\":"
                        "\"off\",\"expires\":2000000000}";
    CHECK(handle(&dev, other, 1000, ack, sizeof ack) == ESL_DEV_E_DEVICE);
    CHECK(strstr(ack, "\"status\":\"invalid\"") && strstr(ack, "another device"));
    CHECK(strstr(ack, "\"device\":\"light.kitchen\"") != NULL);
    const char *old = "{\"v\":1,\"id\":\"r3-0\",\"device\":\"light.kitchen\",\"action\":"
                      "\"off\",\"expires\":999}";
    CHECK(handle(&dev, old, 1000, ack, sizeof ack) == ESL_DEV_E_EXPIRED);
    CHECK(strstr(ack, "\"status\":\"expired\"") != NULL);
    CHECK(handle(&dev, old, 0, ack, sizeof ack) == ESL_DEV_OK); /* no clock: no check */
    CHECK(l.applied == 2);
    CHECK(handle(&dev, "{\"v\":1", 1000, ack, sizeof ack) == ESL_DEV_E_JSON);
    CHECK(ack[0] == '\0');
    CHECK(handle(&dev, "{\"v\":1}", 1000, ack, sizeof ack) == ESL_DEV_E_NO_ID);
    CHECK(ack[0] == '\0');

    /* refusals and failures are acked and not remembered: a resend tries again */
    l.answer = ESL_DEV_E_UNSUPPORTED;
    const char *dim = CMD("\"id\":\"r4-0\",\"action\":\"brightness\",\"value\":10");
    CHECK(handle(&dev, dim, 1000, ack, sizeof ack) == ESL_DEV_E_UNSUPPORTED);
    CHECK(strstr(ack, "\"status\":\"unsupported\"") != NULL);
    l.answer = ESL_DEV_DUPLICATE; /* anything else from apply is a failure */
    CHECK(handle(&dev, dim, 1000, ack, sizeof ack) == ESL_DEV_E_FAILED);
    CHECK(strstr(ack, "\"status\":\"error\"") != NULL);
    l.answer = ESL_DEV_OK;
    CHECK(handle(&dev, dim, 1000, ack, sizeof ack) == ESL_DEV_OK);
    CHECK(l.applied == 3);

    /* the ring forgets the oldest id after ESL_DEV_SEEN more */
    for (int i = 0; i < ESL_DEV_SEEN; i++) {
        char json[200];
        snprintf(json, sizeof json, CMD("\"id\":\"fill-%d\",\"action\":\"on\""), i);
        CHECK(handle(&dev, json, 1000, ack, sizeof ack) == ESL_DEV_OK);
    }
    CHECK(!esl_dev_seen(&dev, "r1-0") && esl_dev_seen(&dev, "fill-0"));
    CHECK(esl_dev_seen(&dev, "fill-31") && !esl_dev_seen(&dev, "fill-32"));
    CHECK(handle(&dev, on, 1000, ack, sizeof ack) == ESL_DEV_OK); /* forgotten: runs */
    CHECK(!esl_dev_seen(&dev, "fill-0"));
}

static void test_ack_write(void) {
    char out[ESL_DEV_ACK_MAX + 16];
    esl_dev_state all = {ESL_POWER_CLOSED, 1, -1.234567891e+308, 1, -1.234567891e+308,
                         1, -1.234567891e+308};
    char id[ESL_DEV_ID_MAX], device[ESL_DEV_NAME_MAX];
    memset(id, 'i', sizeof id - 1);
    id[sizeof id - 1] = '\0';
    memset(device, 'd', sizeof device - 1);
    device[sizeof device - 1] = '\0';

    /* the longest ack the library writes fits the ESL_DEV_ACK_MAX the header promises */
    int longest = 0;
    for (int st = ESL_DEV_OK; st <= ESL_DEV_E_FAILED; st++) {
        if (esl_dev_ack_status((esl_dev_status)st) == NULL) continue;
        int n = esl_dev_ack_write(out, sizeof out, id, device, (esl_dev_status)st, &all,
                                  esl_dev_strerror((esl_dev_status)st));
        CHECK(n > 0 && (size_t)n == strlen(out));
        if (n > longest) longest = n;
    }
    CHECK(longest < ESL_DEV_ACK_MAX);
    if (longest >= ESL_DEV_ACK_MAX) fprintf(stderr, "  longest ack: %d bytes\n", longest);

    /* exactly enough room, and one byte less */
    int n = esl_dev_ack_write(out, sizeof out, "a", "d", ESL_DEV_OK, NULL, NULL);
    CHECK(n == (int)strlen("{\"id\":\"a\",\"device\":\"d\",\"status\":\"ok\"}"));
    CHECK(esl_dev_ack_write(out, (size_t)n + 1, "a", "d", ESL_DEV_OK, NULL, NULL) == n);
    CHECK(esl_dev_ack_write(out, (size_t)n, "a", "d", ESL_DEV_OK, NULL, NULL) == -1);
    CHECK(out[0] == '\0');

    /* strings are escaped; unknown state keys are left out; no ack for E_JSON */
    esl_dev_state none = {ESL_POWER_UNKNOWN, 0, 0, 0, 0, 0, 0};
    n = esl_dev_ack_write(out, sizeof out, "a", "d", ESL_DEV_E_FAILED, &none,
                          "say \"hi\"\\\n");
    CHECK(n > 0 && strcmp(out, "{\"id\":\"a\",\"device\":\"d\",\"status\":\"error\","
                               "\"state\":{},\"error\":\"say \\\"hi\\\"\\\\\\u000a\"}") == 0);
    CHECK(esl_dev_ack_write(out, sizeof out, "a", "d", ESL_DEV_E_JSON, NULL, NULL) == -1);

    /* a handle() whose ack does not fit reports it and sends nothing */
    esl_dev dev;
    light l = {0, ESL_DEV_OK};
    esl_dev_cmd cmd;
    size_t len = 99;
    const char *on = CMD("\"id\":\"r1\",\"action\":\"on\"");
    CHECK(esl_dev_init(&dev, "light.kitchen", light_apply, &l, NULL) == ESL_DEV_OK);
    CHECK(esl_dev_handle(&dev, on, strlen(on), 0, &cmd, out, 20, &len) == ESL_DEV_E_SPACE);
    CHECK(len == 0 && out[0] == '\0');
    CHECK(esl_dev_handle(NULL, on, strlen(on), 0, &cmd, out, 20, &len) == ESL_DEV_E_ARG);
    for (int st = 0; st <= ESL_DEV_E_ARG + 1; st++) {
        CHECK(esl_dev_strerror((esl_dev_status)st) != NULL);
    }
}

/* --- the fuzz driver ----------------------------------------------------------------- */

static int drive(long long now) {
    esl_dev dev;
    light l = {0, ESL_DEV_OK};
    esl_dev_cmd cmd;
    char ack[ESL_DEV_ACK_MAX];
    unsigned char head[4];
    esl_dev_state off = {ESL_POWER_OFF, 0, 0, 0, 0, 0, 0};
    if (esl_dev_init(&dev, "light.kitchen", light_apply, &l, &off) != ESL_DEV_OK) return 2;
    while (fread(head, 1, 4, stdin) == 4) {
        size_t len = (size_t)head[0] << 24 | (size_t)head[1] << 16 | (size_t)head[2] << 8 |
                     head[3];
        char *payload = malloc(len ? len : 1);
        size_t ack_len = 0;
        if (payload == NULL || fread(payload, 1, len, stdin) != len) return 3;
        esl_dev_status st =
            esl_dev_handle(&dev, payload, len, now, &cmd, ack, sizeof ack, &ack_len);
        printf("%d %s\n", (int)st, ack_len ? ack : "-");
        fflush(stdout); /* one answer per record, as it happens */
        free(payload);
    }
    printf("applied %d\n", l.applied);
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--stdin") == 0) return drive(atoll(argv[2]));
    test_parse_valid();
    test_parse_not_json();
    test_parse_field_errors();
    test_handle();
    test_ack_write();
    if (failures) {
        fprintf(stderr, "%d of %d checks failed\n", failures, checks);
        return 1;
    }
    printf("ok %d checks\n", checks);
    return 0;
}
