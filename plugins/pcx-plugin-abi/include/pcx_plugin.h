/*
 * pcx plugin ABI, version 1.0: the C view of plugins/pcx-plugin-abi/src/lib.rs.
 *
 * A plugin is a shared library exporting
 *
 *     const PcxPluginDescriptor *pcx_plugin_entry_v1(void);
 *
 * which returns a descriptor that stays valid for the life of the process. The struct only
 * ever grows at the end; `struct_size` tells the host which fields exist. Only plain C types
 * cross the boundary. Each side frees what it allocated: output bytes go through the host's
 * sinks (which enforce its size limit), error text into the host's buffer, and value handles
 * are released by the plugin's own drop_value.
 */
#ifndef PCX_PLUGIN_H
#define PCX_PLUGIN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PCX_PLUGIN_MAGIC "PCXPLUG" /* 8 bytes with the terminating NUL */
#define PCX_ABI_MAJOR 1
#define PCX_ABI_MINOR 0

typedef int32_t PcxStatus;
#define PCX_STATUS_OK 0
#define PCX_STATUS_ERROR 1
#define PCX_STATUS_PANIC 2
#define PCX_STATUS_OUTPUT_LIMIT 3

#define PCX_CAP_EDIT 1u

/* A borrowed byte slice; ptr may be NULL only when len is 0. */
typedef struct PcxBytes {
    const uint8_t *ptr;
    size_t len;
} PcxBytes;

/* Host-provided output: call write(ctx, ptr, len) to append; it returns
 * PCX_STATUS_OUTPUT_LIMIT once the total would pass the host's limit. */
typedef struct PcxSink {
    void *ctx;
    PcxStatus (*write)(void *ctx, const uint8_t *ptr, size_t len);
} PcxSink;

/* Host-provided error buffer: write at most cap bytes of UTF-8 at ptr and set len. */
typedef struct PcxErrorBuf {
    uint8_t *ptr;
    size_t cap;
    size_t len;
} PcxErrorBuf;

typedef PcxStatus (*PcxAfterDeserializationFn)(PcxBytes kind, PcxBytes input, void **value_out,
                                               PcxErrorBuf *err);
typedef PcxStatus (*PcxDescribeFn)(const void *value, PcxSink *bytes_out, PcxSink *json_out,
                                   PcxErrorBuf *err);
typedef void (*PcxDropValueFn)(void *value);
typedef PcxStatus (*PcxEditFn)(PcxBytes kind, PcxBytes op, PcxBytes args, PcxBytes content,
                               PcxSink *out, PcxErrorBuf *err);

typedef struct PcxPluginDescriptor {
    uint8_t magic[8];
    uint32_t struct_size;
    uint16_t abi_major;
    uint16_t abi_minor;
    PcxBytes name;
    PcxBytes version;
    PcxBytes target; /* e.g. "x86_64-unknown-linux-gnu" */
    const PcxBytes *kinds; /* names matching [a-z0-9_.-]{1,64} */
    size_t kind_count;
    uint64_t capabilities;
    PcxAfterDeserializationFn after_deserialization;
    PcxDescribeFn describe;
    PcxDropValueFn drop_value;
    const PcxBytes *edit_names;
    size_t edit_count;
    PcxEditFn edit; /* may be NULL without PCX_CAP_EDIT */
} PcxPluginDescriptor;

const PcxPluginDescriptor *pcx_plugin_entry_v1(void);

#ifdef __cplusplus
}
#endif

#endif /* PCX_PLUGIN_H */
