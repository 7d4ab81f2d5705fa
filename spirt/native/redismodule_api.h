/*
 * redismodule_api.h - the small part of the Redis/Valkey module ABI that spirt's tensor module uses.
 *
 * Written for this project from the documented module API semantics (it is not a copy of the
 * server's redismodule.h, which no package ships). It declares:
 *   - the numeric constants the tensor module passes to or receives from the server,
 *   - opaque handle types,
 *   - one function-pointer global per API function used (static: tensor.c is the only file of the
 *     module that includes this header; the kernels in kernels.c never call the server), and
 *   - spirt_module_init(), the equivalent of the usual init call: it takes the server's GetApi entry
 *     point from the first word of the context, resolves every "RedisModule_<Name>" listed below,
 *     fails cleanly (REDISMODULE_ERR, nothing registered) if one is missing, and then registers the
 *     module name and version with SetModuleAttribs.
 *
 * Both Redis and Valkey export their API under the "RedisModule_" names, so the same shared object
 * loads into either server (checked with Redis 7.0 and Valkey 9.1).
 */
#ifndef SPIRT_REDISMODULE_API_H
#define SPIRT_REDISMODULE_API_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ---- status codes and versions ---------------------------------------------------------------- */
#define REDISMODULE_OK 0
#define REDISMODULE_ERR 1
#define REDISMODULE_APIVER_1 1

/* ---- OpenKey modes ---------------------------------------------------------------------------- */
#define REDISMODULE_READ (1 << 0)
#define REDISMODULE_WRITE (1 << 1)

/* ---- KeyType results -------------------------------------------------------------------------- */
#define REDISMODULE_KEYTYPE_EMPTY 0
#define REDISMODULE_KEYTYPE_STRING 1
#define REDISMODULE_KEYTYPE_LIST 2
#define REDISMODULE_KEYTYPE_HASH 3
#define REDISMODULE_KEYTYPE_SET 4
#define REDISMODULE_KEYTYPE_ZSET 5
#define REDISMODULE_KEYTYPE_MODULE 6
#define REDISMODULE_KEYTYPE_STREAM 7

/* ---- ListPush / ListPop ends ------------------------------------------------------------------ */
#define REDISMODULE_LIST_HEAD 0
#define REDISMODULE_LIST_TAIL 1

/* ---- keyspace notification classes ------------------------------------------------------------- */
#define REDISMODULE_NOTIFY_GENERIC (1 << 2)
#define REDISMODULE_NOTIFY_STRING (1 << 3)
#define REDISMODULE_NOTIFY_LIST (1 << 4)

/* ---- opaque handles --------------------------------------------------------------------------- */
typedef struct RedisModuleCtx RedisModuleCtx;
typedef struct RedisModuleKey RedisModuleKey;
typedef struct RedisModuleString RedisModuleString;

/* A command implementation: argv[0] is the command name; returns REDISMODULE_OK after replying. */
typedef int (*RedisModuleCmdFunc)(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);

/*
 * The API functions used by the module: X(return type, Name, (parameter types)).
 * Each becomes a static pointer RedisModule_<Name> resolved at load time.
 */
#define SPIRT_RM_API_LIST(X)                                                                          \
    X(int, CreateCommand,                                                                             \
      (RedisModuleCtx *, const char *, RedisModuleCmdFunc, const char *, int, int, int))              \
    X(void, SetModuleAttribs, (RedisModuleCtx *, const char *, int, int))                             \
    X(RedisModuleKey *, OpenKey, (RedisModuleCtx *, RedisModuleString *, int))                        \
    X(void, CloseKey, (RedisModuleKey *))                                                             \
    X(int, KeyType, (RedisModuleKey *))                                                               \
    X(size_t, ValueLength, (RedisModuleKey *))                                                        \
    X(char *, StringDMA, (RedisModuleKey *, size_t *, int))                                           \
    X(int, StringTruncate, (RedisModuleKey *, size_t))                                                \
    X(const char *, StringPtrLen, (const RedisModuleString *, size_t *))                              \
    X(int, ReplyWithError, (RedisModuleCtx *, const char *))                                          \
    X(int, ReplyWithLongLong, (RedisModuleCtx *, long long))                                          \
    X(int, ReplyWithDouble, (RedisModuleCtx *, double))                                               \
    X(int, ReplyWithArray, (RedisModuleCtx *, long))                                                  \
    X(int, ReplyWithSimpleString, (RedisModuleCtx *, const char *))                                   \
    X(int, ReplyWithStringBuffer, (RedisModuleCtx *, const char *, size_t))                           \
    X(int, ReplicateVerbatim, (RedisModuleCtx *))                                                     \
    X(int, IsKeysPositionRequest, (RedisModuleCtx *))                                                 \
    X(void, KeyAtPos, (RedisModuleCtx *, int))                                                        \
    X(int, NotifyKeyspaceEvent, (RedisModuleCtx *, int, const char *, RedisModuleString *))           \
    X(void *, Alloc, (size_t))                                                                        \
    X(int, StringSet, (RedisModuleKey *, RedisModuleString *))                                        \
    X(int, SetExpire, (RedisModuleKey *, long long))                                                  \
    X(RedisModuleString *, CreateString, (RedisModuleCtx *, const char *, size_t))                    \
    X(void, FreeString, (RedisModuleCtx *, RedisModuleString *))                                      \
    X(int, ListPush, (RedisModuleKey *, int, RedisModuleString *))                                    \
    X(RedisModuleString *, ListPop, (RedisModuleKey *, int))                                          \
    X(int, StringToLongLong, (const RedisModuleString *, long long *))                                \
    X(void, Free, (void *))                                                                           \
    X(void, Log, (RedisModuleCtx *, const char *, const char *, ...))

#define SPIRT_RM_DECLARE(ret, name, args) static ret(*RedisModule_##name) args = NULL;
SPIRT_RM_API_LIST(SPIRT_RM_DECLARE)
#undef SPIRT_RM_DECLARE

/* Optional: present in every server version we target, but a missing one is not fatal. */
static int (*RedisModule_IsModuleNameBusy)(const char *) = NULL;

/* The server's lookup function: fills *slot with the named function and returns REDISMODULE_OK. */
typedef int (*spirt_getapi_fn)(const char *name, void *slot);

/*
 * Resolve the API and register the module. Call first thing in RedisModule_OnLoad.
 * Returns REDISMODULE_ERR (and registers nothing) when the server lacks a function we need, or when
 * a module with the same name is already loaded.
 */
static int spirt_module_init(RedisModuleCtx *ctx, const char *name, int version, int apiver) {
    void *first_word;
    spirt_getapi_fn getapi;
    if (ctx == NULL) return REDISMODULE_ERR;
    /* The server's context structure starts with a pointer to its GetApi function. */
    memcpy(&first_word, (const void *)ctx, sizeof first_word);
    if (first_word == NULL) return REDISMODULE_ERR;
    memcpy(&getapi, &first_word, sizeof getapi);

#define SPIRT_RM_RESOLVE(ret, fname, args)                                                            \
    if (getapi("RedisModule_" #fname, (void *)&RedisModule_##fname) != REDISMODULE_OK ||                \
        RedisModule_##fname == NULL)                                                                  \
        return REDISMODULE_ERR;
    SPIRT_RM_API_LIST(SPIRT_RM_RESOLVE)
#undef SPIRT_RM_RESOLVE

    if (getapi("RedisModule_IsModuleNameBusy", (void *)&RedisModule_IsModuleNameBusy) != REDISMODULE_OK)
        RedisModule_IsModuleNameBusy = NULL;
    if (RedisModule_IsModuleNameBusy != NULL && RedisModule_IsModuleNameBusy(name)) return REDISMODULE_ERR;

    RedisModule_SetModuleAttribs(ctx, name, version, apiver);
    return REDISMODULE_OK;
}

#endif /* SPIRT_REDISMODULE_API_H */
