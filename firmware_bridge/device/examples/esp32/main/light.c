/*
 * light.c - an ESP32 dimmable light on the edgeslm JSON protocol (ESP-IDF v5, esp-mqtt).
 *
 * Wiring: an LED (or a MOSFET driving an LED strip) on LIGHT_GPIO, dimmed by LEDC PWM.
 * The registry entry on the Pi that matches it:
 *
 *   - id: light.kitchen
 *     name: Kitchen light
 *     capabilities: [on_off, brightness]
 *     mqtt: {adapter: json, topic: home/kitchen/light}
 *
 * Flow: esp-mqtt delivers a message on home/kitchen/light/command; esl_dev_handle()
 * parses and checks it, drops an id it has already carried out, calls apply() below
 * once, and writes the ack, which goes back with QoS 1 to the command's reply_to.
 * The clock comes from SNTP; until it is set, expiry is left to the broker (MQTT 5
 * message expiry). This file is an example to adapt: it is checked for syntax on the
 * host against stand-in headers (tests/test_bridge_device.py), never built there.
 */
#include <string.h>
#include <time.h>

#include "driver/ledc.h"
#include "esp_event.h"
#include "esp_log.h"
#include "esp_netif.h"
#include "esp_sntp.h"
#include "mqtt_client.h"
#include "nvs_flash.h"
#include "protocol_examples_common.h"

#include "esl_device.h"

#define DEVICE_ID "light.kitchen"
#define COMMAND_TOPIC "home/kitchen/light/command"
#define AVAILABILITY_TOPIC "home/kitchen/light/availability"
#define BROKER_URI "mqtts://raspberrypi.local:8883" /* the Pi's TLS listener */
#define BROKER_USER "device"
#define BROKER_PASSWORD "change-me"  /* one per device, in the broker's password file */
#define TIME_SERVER "raspberrypi.local" /* the Pi can serve time (chrony) */
#define LIGHT_GPIO 2
#define DUTY_MAX 8191 /* 13-bit LEDC resolution */

static const char *TAG = "esl-light";

/* The Pi's CA certificate (PEM), embedded at build time or pasted here. */
static const char BROKER_CA_PEM[] = "-----BEGIN CERTIFICATE-----\n...\n";

/* One device, its scratch command and its ack buffer: about 3 KB of static memory. */
static esl_dev light;
static esl_dev_cmd cmd;
static char ack[ESL_DEV_ACK_MAX];

static void set_duty(double percent) {
    uint32_t duty = (uint32_t)(percent * DUTY_MAX / 100.0);
    ledc_set_duty(LEDC_LOW_SPEED_MODE, LEDC_CHANNEL_0, duty);
    ledc_update_duty(LEDC_LOW_SPEED_MODE, LEDC_CHANNEL_0);
}

/* Called once per new command id, after every protocol check has passed. */
static esl_dev_status apply(void *user, const esl_dev_cmd *c, esl_dev_state *state) {
    (void)user;
    switch (c->action) {
    case ESL_ACT_ON:
        set_duty(state->has_brightness && state->brightness > 0 ? state->brightness : 100);
        state->power = ESL_POWER_ON;
        return ESL_DEV_OK;
    case ESL_ACT_OFF:
        set_duty(0);
        state->power = ESL_POWER_OFF;
        return ESL_DEV_OK;
    case ESL_ACT_BRIGHTNESS: /* 0..100, checked by esl_dev_handle */
        set_duty(c->value);
        state->has_brightness = 1;
        state->brightness = c->value;
        state->power = c->value > 0 ? ESL_POWER_ON : ESL_POWER_OFF;
        return ESL_DEV_OK;
    default:
        return ESL_DEV_E_UNSUPPORTED; /* a light does not open, close or heat */
    }
}

/* Unix time once SNTP has set the clock, else 0 (esl_dev_handle then skips expiry). */
static int64_t unix_now(void) {
    time_t now = time(NULL);
    return now > 1700000000 ? (int64_t)now : 0;
}

static void on_mqtt(void *arg, esp_event_base_t base, int32_t event_id, void *data) {
    esp_mqtt_event_handle_t event = data;
    esp_mqtt_client_handle_t client = event->client;
    (void)arg;
    (void)base;

    switch ((esp_mqtt_event_id_t)event_id) {
    case MQTT_EVENT_CONNECTED:
        esp_mqtt_client_subscribe(client, COMMAND_TOPIC, 1);
        esp_mqtt_client_enqueue(client, AVAILABILITY_TOPIC, "online", 0, 1, 1, true);
        break;

    case MQTT_EVENT_DATA: {
        size_t ack_len = 0;
        esl_dev_status st;

        /* commands are a few hundred bytes: a message split over events is not one */
        if (event->current_data_offset != 0 || event->data_len != event->total_data_len) {
            ESP_LOGW(TAG, "dropped a %d-byte message: too large", event->total_data_len);
            break;
        }
        st = esl_dev_handle(&light, event->data, (size_t)event->data_len, unix_now(), &cmd,
                            ack, sizeof ack, &ack_len);
        ESP_LOGI(TAG, "command %s: %s", cmd.id[0] ? cmd.id : "?", esl_dev_strerror(st));

        /* enqueue, not publish: never block the MQTT task inside its own handler */
        if (ack_len > 0 && cmd.reply_to[0] != '\0') {
            esp_mqtt_client_enqueue(client, cmd.reply_to, ack, (int)ack_len, 1, 0, true);
        }
        break;
    }

    default:
        break;
    }
}

void app_main(void) {
    const esl_dev_state off = {.power = ESL_POWER_OFF};
    const ledc_timer_config_t timer = {
        .speed_mode = LEDC_LOW_SPEED_MODE,
        .duty_resolution = LEDC_TIMER_13_BIT,
        .timer_num = LEDC_TIMER_0,
        .freq_hz = 5000,
        .clk_cfg = LEDC_AUTO_CLK,
    };
    const ledc_channel_config_t channel = {
        .gpio_num = LIGHT_GPIO,
        .speed_mode = LEDC_LOW_SPEED_MODE,
        .channel = LEDC_CHANNEL_0,
        .timer_sel = LEDC_TIMER_0,
        .duty = 0,
    };
    const esp_mqtt_client_config_t mqtt_config = {
        .broker.address.uri = BROKER_URI,
        .broker.verification.certificate = BROKER_CA_PEM,
        .credentials.username = BROKER_USER,
        .credentials.authentication.password = BROKER_PASSWORD,
        .session.last_will = {
            .topic = AVAILABILITY_TOPIC,
            .msg = "offline",
            .qos = 1,
            .retain = 1,
        },
        .session.disable_clean_session = true, /* keep QoS 1 commands across drops */
    };

    /* the PWM output, off until told otherwise */
    ESP_ERROR_CHECK(ledc_timer_config(&timer));
    ESP_ERROR_CHECK(ledc_channel_config(&channel));
    ESP_ERROR_CHECK(esl_dev_init(&light, DEVICE_ID, apply, NULL, &off) == ESL_DEV_OK
                        ? ESP_OK
                        : ESP_FAIL);

    /* network, then the clock, then MQTT */
    ESP_ERROR_CHECK(nvs_flash_init());
    ESP_ERROR_CHECK(esp_netif_init());
    ESP_ERROR_CHECK(esp_event_loop_create_default());
    ESP_ERROR_CHECK(example_connect());
    esp_sntp_setoperatingmode(SNTP_OPMODE_POLL);
    esp_sntp_setservername(0, TIME_SERVER);
    esp_sntp_init();

    esp_mqtt_client_handle_t client = esp_mqtt_client_init(&mqtt_config);
    esp_mqtt_client_register_event(client, ESP_EVENT_ANY_ID, on_mqtt, NULL);
    ESP_ERROR_CHECK(esp_mqtt_client_start(client));
}
