/*
 * esl_device.h - the device side of the edgeslm JSON command/ack protocol, in portable C.
 *
 * For firmware authors: give it the payload of a message that arrived on the device's
 * `<topic>/command` and it parses and checks the command, drops an id it has already
 * carried out, calls your function to act, and writes the ack to publish on the
 * command's `reply_to` topic. docs/PROTOCOL.md is the protocol; this is one reading
 * of it, tested on the host by tests/test_bridge_device.py.
 *
 * Portable C99: no allocation, no global state, no dependency beyond the C library
 * (snprintf, strtod, memcpy). Everything lives in the caller's `esl_dev` (about 2.2 KB
 * with the defaults below) and in the caller's buffers. Not thread-safe: call it from
 * one task, or guard the `esl_dev` with a mutex.
 *
 * strtod reads numbers, so the C locale's decimal point is assumed (the default on
 * embedded C libraries; call setlocale(LC_NUMERIC, "C") on a host that changes it).
 */
#ifndef ESL_DEVICE_H
#define ESL_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ESL_DEV_PROTOCOL 1 /* the "v" this code speaks */

/* Buffer sizes in bytes, each including the terminating NUL. Override before including
 * this header (all translation units alike) to trade memory for longer names. */
#ifndef ESL_DEV_ID_MAX
#define ESL_DEV_ID_MAX 65 /* command ids: 1-64 of [A-Za-z0-9_-] */
#endif
#ifndef ESL_DEV_NAME_MAX
#define ESL_DEV_NAME_MAX 65 /* registry device ids, e.g. "light.kitchen" */
#endif
#ifndef ESL_DEV_TOPIC_MAX
#define ESL_DEV_TOPIC_MAX 129 /* the reply_to topic */
#endif
#ifndef ESL_DEV_SEEN
#define ESL_DEV_SEEN 32 /* command ids remembered for duplicate detection */
#endif
#define ESL_DEV_MAX_DEPTH 8 /* deepest nesting accepted in unknown fields */

/* An ack buffer of this many bytes always holds the ack esl_dev_handle writes. */
#define ESL_DEV_ACK_MAX (ESL_DEV_ID_MAX + ESL_DEV_NAME_MAX + 256)

/* Outcomes. Keep in sync with docs/PROTOCOL.md ("C reference"). */
typedef enum esl_dev_status {
    ESL_DEV_OK = 0,          /* carried out; ack "ok" */
    ESL_DEV_DUPLICATE = 1,   /* id carried out before; not repeated; ack "duplicate" */
    ESL_DEV_E_JSON = 2,      /* not one well-formed JSON object; no ack (no trusted id) */
    ESL_DEV_E_NO_ID = 3,     /* no valid "id"; no ack (nothing to answer to) */
    ESL_DEV_E_FIELD = 4,     /* a field missing, repeated or of the wrong type; "invalid" */
    ESL_DEV_E_VERSION = 5,   /* "v" is not ESL_DEV_PROTOCOL; "invalid" */
    ESL_DEV_E_DEVICE = 6,    /* "device" names another device; "invalid" */
    ESL_DEV_E_ACTION = 7,    /* unknown "action"; "invalid" */
    ESL_DEV_E_VALUE = 8,     /* "value" missing, extra, or not finite; "invalid" */
    ESL_DEV_E_EXPIRED = 9,   /* "expires" is in the past; not carried out; "expired" */
    ESL_DEV_E_UNSUPPORTED = 10, /* the apply callback refused it; "unsupported" */
    ESL_DEV_E_FAILED = 11,   /* the apply callback tried and failed; "error" */
    ESL_DEV_E_SPACE = 12,    /* the ack buffer is too small; nothing written */
    ESL_DEV_E_ARG = 13       /* NULL pointer or bad argument */
} esl_dev_status;

typedef enum esl_dev_action {
    ESL_ACT_ON = 0,
    ESL_ACT_OFF,
    ESL_ACT_OPEN,
    ESL_ACT_CLOSE,
    ESL_ACT_BRIGHTNESS, /* value: percent, 0..100 */
    ESL_ACT_POSITION,   /* value: percent open, 0..100 */
    ESL_ACT_TEMPERATURE /* value: degrees Celsius */
} esl_dev_action;

/* One parsed command. Strings are NUL-terminated copies; the payload can be freed. */
typedef struct esl_dev_cmd {
    int version;                      /* "v" */
    char id[ESL_DEV_ID_MAX];          /* "id" */
    char device[ESL_DEV_NAME_MAX];    /* "device" */
    esl_dev_action action;            /* "action" */
    int has_value;                    /* 1 when "value" is a number */
    double value;                     /* "value", finite */
    int64_t expires;                  /* "expires": Unix seconds, >= 0; 0 = never */
    char reply_to[ESL_DEV_TOPIC_MAX]; /* "reply_to"; "" when absent */
} esl_dev_cmd;

/* What the device reports in acks. ESL_POWER_UNKNOWN and has_* = 0 leave keys out. */
typedef enum esl_dev_power {
    ESL_POWER_UNKNOWN = 0,
    ESL_POWER_ON,
    ESL_POWER_OFF,
    ESL_POWER_OPEN,
    ESL_POWER_CLOSED
} esl_dev_power;

typedef struct esl_dev_state {
    esl_dev_power power; /* "state": "ON", "OFF", "OPEN", "CLOSED" */
    int has_brightness;
    double brightness; /* "brightness", percent */
    int has_position;
    double position; /* "position", percent open */
    int has_temperature;
    double temperature; /* "temperature", degrees Celsius (the set point) */
} esl_dev_state;

/*
 * Carries out one checked command: drive the hardware and update *state.
 * Return ESL_DEV_OK, ESL_DEV_E_UNSUPPORTED (this device cannot do it, e.g. a value out
 * of its range: nothing happened) or ESL_DEV_E_FAILED (it tried and failed).
 * Called at most once per command id while the id is remembered.
 */
typedef esl_dev_status (*esl_dev_apply_fn)(void *user, const esl_dev_cmd *cmd,
                                           esl_dev_state *state);

/* One device. Initialize with esl_dev_init; treat the fields as private. */
typedef struct esl_dev {
    char id[ESL_DEV_NAME_MAX];
    esl_dev_apply_fn apply;
    void *user;
    esl_dev_state state;
    char seen[ESL_DEV_SEEN][ESL_DEV_ID_MAX]; /* ring of carried-out command ids */
    unsigned seen_next;                      /* slot the next id goes to */
    unsigned seen_count;                     /* slots in use, <= ESL_DEV_SEEN */
} esl_dev;

/*
 * Prepares `dev` for the registry device `device_id` (copied; at most
 * ESL_DEV_NAME_MAX - 1 bytes). `apply` is called with `user` for every new command;
 * `initial` (may be NULL: all unknown) is the state reported until the first change.
 * Returns ESL_DEV_OK, or ESL_DEV_E_ARG for NULL `dev`/`apply` or a bad `device_id`.
 */
esl_dev_status esl_dev_init(esl_dev *dev, const char *device_id, esl_dev_apply_fn apply,
                            void *user, const esl_dev_state *initial);

/*
 * Parses `len` bytes of `json` (need not be NUL-terminated) into *cmd without checking
 * it against any device. Returns ESL_DEV_OK, ESL_DEV_E_JSON, ESL_DEV_E_NO_ID,
 * ESL_DEV_E_FIELD, ESL_DEV_E_VERSION, ESL_DEV_E_ACTION or ESL_DEV_E_VALUE. After any
 * result but ESL_DEV_E_JSON, cmd->id holds the id if one was read ("" otherwise) and
 * cmd->reply_to the reply topic if one was read. Unknown keys are skipped.
 */
esl_dev_status esl_dev_parse(const char *json, size_t len, esl_dev_cmd *cmd);

/*
 * The whole device side for one message: parse, check the device id, answer a
 * remembered id with "duplicate" (without acting), check expiry against `now` (Unix
 * seconds; 0 = no clock, rely on MQTT 5 message expiry), call apply, remember the id,
 * and write the ack JSON into `ack` (`cap` bytes, NUL-terminated; *ack_len excludes the
 * NUL). Publish it with QoS 1, not retained, to cmd->reply_to (or the MQTT 5 response
 * topic). *ack_len is 0 when there is nothing to send (ESL_DEV_E_JSON, ESL_DEV_E_NO_ID)
 * or the ack did not fit (ESL_DEV_E_SPACE; ESL_DEV_ACK_MAX bytes always suffice).
 * `cmd` is caller-owned scratch and holds the parsed command afterwards.
 */
esl_dev_status esl_dev_handle(esl_dev *dev, const char *payload, size_t len, int64_t now,
                              esl_dev_cmd *cmd, char *ack, size_t cap, size_t *ack_len);

/*
 * Writes an ack for command `id` with `status` into `out` (`cap` bytes, NUL-terminated):
 * {"id":..,"device":..,"status":..,"state":{..}} with "state" when `state` is not NULL
 * and "error" when `error` is not NULL. Returns the length without the NUL, or -1 when
 * `cap` is too small (nothing usable written) or an argument is NULL.
 */
int esl_dev_ack_write(char *out, size_t cap, const char *id, const char *device,
                      esl_dev_status status, const esl_dev_state *state,
                      const char *error);

/* The protocol's ack status for a result: "ok", "duplicate", "invalid", "expired",
 * "unsupported" or "error"; NULL for results that are never acked. */
const char *esl_dev_ack_status(esl_dev_status status);

/* A static English description of `status` (never NULL). */
const char *esl_dev_strerror(esl_dev_status status);

/* 1 when command `id` was carried out and is still remembered, else 0. */
int esl_dev_seen(const esl_dev *dev, const char *id);

#ifdef __cplusplus
}
#endif

#endif /* ESL_DEVICE_H */
